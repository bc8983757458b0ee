"""Parallel ranged fetch of large layers, against the real server and real registries.

A ``docker-registry`` honours ``Range``; a byte-level relay in front of it
sees every part's request head, and cuts or corrupts one part; the
HTTP-level relay of :mod:`.upstream_servers` forwards no ``Range`` (an
upstream that ignores it), or redirects blob GETs elsewhere (a CDN).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dockmirror.cache.parts import plan

from .registries import LOOPBACK, wait_until
from .relay import Fault
from .test_faults import Answer, AnsweringRelay
from .upstream_servers import Relay as HTTPRelay
from .upstream_servers import redirect

#: The layer fetched in parts (a little more once in its tar), and how: 4 parts.
LAYER = 24 << 20
PARTS = 4
#: Per-connection rate of the relay: a slow link, where one connection would
#: take seconds more, so the fill soon spreads over more connections.
RATE = 4 << 20


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def ranged(url: str, **extra: Any) -> dict[str, Any]:
    """An upstream table whose blobs of 4 MiB and more are fetched in 4 parts."""
    return {
        "hub": {
            "plugin": "registry",
            "url": url,
            "default": True,
            "parallel_min_size": "4MiB",
            "parallel_parts": PARTS,
            "read_timeout": 5,
            **extra,
        }
    }


def get(mirror: Any, path: str) -> tuple[int, bytes, bool]:
    """GET ``path`` from the mirror: status, body, and whether the body was whole."""
    connection = http.client.HTTPConnection(LOOPBACK, mirror.port, timeout=60)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        try:
            return response.status, response.read(), True
        except http.client.IncompleteRead as e:
            return response.status, e.partial, False
    except (ConnectionError, http.client.HTTPException):
        return 0, b"", False
    finally:
        connection.close()


def layer_of(seeded: Any, registry: Any, repo: str) -> Any:
    image = seeded(registry, repo, layers=(LAYER,))
    [layer] = image.platforms[0].layers
    assert layer.size > LAYER  # random bytes do not compress
    return layer


def blob_heads(relay: Any, digest: str) -> list[str]:
    return [h for h in relay.heads if h.startswith("GET ") and digest in h.split("\r\n")[0]]


def range_of(head: str) -> str | None:
    m = re.search(r"^Range: (.*)$", head, re.IGNORECASE | re.MULTILINE)
    return m.group(1).strip() if m else None


def cached_files(mirror: Any) -> dict[str, bytes]:
    return {
        f"sha256:{p.name}": p.read_bytes()
        for p in (mirror.cache_dir / "blobs").glob("sha256/*/*")
        if p.is_file()
    }


def cached_blob(mirror: Any, digest: str) -> bytes:
    """The cached file of *digest*, once it is in place (it is, soon after its last byte went)."""
    wait_until(lambda: digest in cached_files(mirror), timeout=10)
    return cached_files(mirror)[digest]


def assert_no_fill_left(mirror: Any) -> None:
    wait_until(lambda: not list((mirror.cache_dir / "tmp").iterdir()), timeout=10)


def fills(mirror: Any, digest: str) -> int:
    return mirror.log_text().count(f"filling {digest}")


def start_of(range_: str) -> int:
    return int(range_.removeprefix("bytes=").partition("-")[0])


def assert_spread(ranges: list[str], size: int) -> list[str]:
    """The first request asked for the whole blob, one stream; once spread, every range
    after the one it was in was asked for once.  Returns those."""
    assert ranges[0] == f"bytes=0-{size - 1}", ranges
    later = sorted(ranges[1:], key=start_of)
    expected = [f"bytes={start}-{end - 1}" for start, end in plan(size, PARTS)]
    assert later and later == expected[-len(later) :], ranges
    return later


def test_large_layer_is_fetched_in_parts_once(
    plain_registry, relay, dockmirror, seeded, unique_repo
):
    layer = layer_of(seeded, plain_registry, unique_repo)
    upstream = relay(plain_registry)
    upstream.faults.append(Fault(r"^GET /v2/.*/blobs/", rate=RATE))
    mirror = dockmirror(ranged(upstream.url))
    path = f"/v2/{unique_repo}/blobs/{layer.digest}"
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: get(mirror, path), range(3)))
    for status, body, whole in results:
        assert (status, whole, sha256(body)) == (200, True, layer.digest)
    # One fill, spread over more connections, each range asked for once.
    assert fills(mirror, layer.digest) == 1
    later = assert_spread(
        [range_of(h) or "" for h in blob_heads(upstream, layer.digest)], layer.size
    )
    assert len(later) >= PARTS - 1
    assert f"over {PARTS} connections" in mirror.log_text()
    assert sha256(cached_blob(mirror, layer.digest)) == layer.digest
    assert_no_fill_left(mirror)
    assert "Traceback" not in mirror.log_text()


def test_parts_go_where_the_registry_redirects_without_its_credentials(
    plain_registry, dockmirror, seeded, unique_repo
):
    """Resolved once; the CDN gets every part and no Authorization; 403s make it resolve again."""
    layer = layer_of(seeded, plain_registry, unique_repo)
    credentials = "Basic " + base64.b64encode(b"mirror:secret").decode()
    with AnsweringRelay(plain_registry.port) as cdn:
        # The signed URL "expires" for two parts: the registry is asked again.
        cdn.faults.append(Answer(r"^GET ", header=r"^Range: bytes=[1-9]", times=2, status=403))
        cdn.faults.append(Fault(r"^GET ", rate=RATE))

        def to_cdn(request: Any) -> bool:
            if request.command != "GET" or "/blobs/" not in request.path:
                return False
            return redirect(lambda r: f"{cdn.url}{r.path}?signature=abc")(request)

        with HTTPRelay(plain_registry.url, {unique_repo: to_cdn}, basic=credentials) as front:
            upstream = ranged(front.url, username="mirror", password="secret")
            mirror = dockmirror(upstream)
            status, body, whole = get(mirror, f"/v2/{unique_repo}/blobs/{layer.digest}")
            assert (status, whole, sha256(body)) == (200, True, layer.digest)
            registry_gets = [
                r for r in front.received if r.method == "GET" and layer.digest in r.path
            ]
    heads = blob_heads(cdn, layer.digest)
    assert heads and all("signature=abc" in h.split("\r\n")[0] for h in heads)
    assert not any(re.search(r"^Authorization:", h, re.I | re.M) for h in heads)
    # The first part, then one new URL for the two refused parts at most twice.
    assert 2 <= len(registry_gets) <= 3, registry_gets
    assert {r.authorization for r in registry_gets} == {credentials}
    # The new URL was asked for once (one byte), and the refused ranges again, there.
    ranges = [range_of(h) or "" for h in heads]
    assert ranges.count("bytes=0-0") == 1, ranges
    later = [r for r in ranges if r != "bytes=0-0"]
    assert len(later) == len(set(later)) + 2, ranges
    assert_spread(sorted(set(later), key=start_of), layer.size)
    assert fills(mirror, layer.digest) == 1
    assert sha256(cached_blob(mirror, layer.digest)) == layer.digest


def test_an_upstream_ignoring_range_falls_back_to_one_stream(
    plain_registry, dockmirror, seeded, unique_repo
):
    layer = layer_of(seeded, plain_registry, unique_repo)
    second = layer_of(seeded, plain_registry, unique_repo + "-2")
    with HTTPRelay(plain_registry.url) as upstream:
        mirror = dockmirror(ranged(upstream.url))
        status, body, whole = get(mirror, f"/v2/{unique_repo}/blobs/{layer.digest}")
        assert (status, whole, sha256(body)) == (200, True, layer.digest)
        gets = [r for r in upstream.received if r.method == "GET" and layer.digest in r.path]
        # Asked for the first part, took the whole body it got instead.
        assert [r.range for r in gets] == [f"bytes=0-{layer.size - 1}"]
        assert "ignores Range (a 200 with the whole body)" in mirror.log_text()
        # Remembered: the next large blob is asked for in one request, without Range.
        status, body, whole = get(mirror, f"/v2/{unique_repo}-2/blobs/{second.digest}")
        assert (status, whole, sha256(body)) == (200, True, second.digest)
        gets = [r for r in upstream.received if r.method == "GET" and second.digest in r.path]
        assert [r.range for r in gets] == [None]
    assert sha256(cached_blob(mirror, layer.digest)) == layer.digest
    assert sha256(cached_blob(mirror, second.digest)) == second.digest
    assert fills(mirror, layer.digest) == 1
    assert_no_fill_left(mirror)


def test_a_part_cut_midway_is_resumed_from_where_it_stopped(
    plain_registry, relay, dockmirror, seeded, unique_repo
):
    layer = layer_of(seeded, plain_registry, unique_repo)
    upstream = relay(plain_registry)
    cut = 1 << 20
    start, end = plan(layer.size, PARTS)[-2]
    header = f"^Range: bytes={start}-"
    upstream.faults.append(Fault(r"^GET ", header=header, cut_after=cut, times=1))
    upstream.faults.append(Fault(r"^GET ", rate=RATE))
    mirror = dockmirror(ranged(upstream.url))
    status, body, whole = get(mirror, f"/v2/{unique_repo}/blobs/{layer.digest}")
    assert (status, whole, sha256(body)) == (200, True, layer.digest)
    ranges = [range_of(h) or "" for h in blob_heads(upstream, layer.digest)]
    # The cut range was asked again from the byte it stopped at, not from its start.
    cut_range = sorted(start_of(r) for r in ranges if r.endswith(f"-{end - 1}"))
    assert len(cut_range) == 2 and cut_range[0] == start, ranges
    assert start < cut_range[1] <= start + cut, ranges
    resumed = f"bytes={cut_range[1]}-{end - 1}"
    assert_spread([r for r in ranges if r != resumed], layer.size)
    assert fills(mirror, layer.digest) == 1
    assert sha256(cached_blob(mirror, layer.digest)) == layer.digest
    assert_no_fill_left(mirror)


def test_a_corrupted_part_caches_nothing(plain_registry, relay, dockmirror, seeded, unique_repo):
    layer = layer_of(seeded, plain_registry, unique_repo)
    upstream = relay(plain_registry)
    upstream.faults.append(
        Fault(r"^GET ", header=r"^Range: bytes=[1-9]", flip=12345, times=1, rate=RATE)
    )
    upstream.faults.append(Fault(r"^GET ", rate=RATE))
    mirror = dockmirror(ranged(upstream.url))
    path = f"/v2/{unique_repo}/blobs/{layer.digest}"
    status, body, whole = get(mirror, path)
    # Never a whole 200 of wrong bytes: the transfer is cut.
    assert not (status == 200 and whole), (status, len(body))
    assert layer.digest not in cached_files(mirror)
    assert_no_fill_left(mirror)
    assert "hashes to" in mirror.log_text()
    # The next request fills it again, soundly.
    status, body, whole = get(mirror, path)
    assert (status, whole, sha256(body)) == (200, True, layer.digest)
    assert sha256(cached_blob(mirror, layer.digest)) == layer.digest


def test_parallel_parts_1_fetches_in_one_stream(
    plain_registry, relay, dockmirror, seeded, unique_repo
):
    layer = layer_of(seeded, plain_registry, unique_repo)
    upstream = relay(plain_registry)
    mirror = dockmirror(ranged(upstream.url, parallel_parts=1))
    status, body, whole = get(mirror, f"/v2/{unique_repo}/blobs/{layer.digest}")
    assert (status, whole, sha256(body)) == (200, True, layer.digest)
    assert [range_of(h) for h in blob_heads(upstream, layer.digest)] == [None]


def test_a_link_fast_enough_for_one_stream_keeps_one_stream(
    plain_registry, dockmirror, seeded, unique_repo
):
    layer = layer_of(seeded, plain_registry, unique_repo)
    mirror = dockmirror(ranged(plain_registry.url))
    status, body, whole = get(mirror, f"/v2/{unique_repo}/blobs/{layer.digest}")
    assert (status, whole, sha256(body)) == (200, True, layer.digest)
    # Loopback carries the layer in well under a second: no reason to spread.
    assert plain_registry.count_requests("GET", f"/blobs/{layer.digest}") == 1
    wait_until(lambda: "over 1 connection, in" in mirror.log_text(), timeout=10)
