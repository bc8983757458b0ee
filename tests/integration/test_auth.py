"""Access control end to end: API keys, docker-login-shaped token flows and skopeo."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest

from .conftest import Dockmirror, DockmirrorFactory, Seeder
from .images import SkopeoError, pull
from .keys import admin, create_key, list_keys
from .registries import Registry, wait_until
from .test_pull import assert_pulled, curl, error_code


def hub_mirror(dockmirror: DockmirrorFactory, registry: Registry, **auth: object) -> Dockmirror:
    """A mirror that requires keys, with Docker Hub (``hub``) played by *registry*."""
    return dockmirror(
        {"hub": {"plugin": "dockerhub", "url": registry.url, "default": True}},
        auth_required=True,
        extra={"auth": auth},
    )


@pytest.fixture
def mirror(plain_registry: Registry, dockmirror: DockmirrorFactory) -> Dockmirror:
    return hub_mirror(dockmirror, plain_registry)


#: An access-log line: client, key, method, URI, status and bytes sent.
ACCESS_LINE = re.compile(
    r"\[dockmirror\.access#info\] (?P<client>\S+) (?P<key>\S+) (?P<method>\S+) (?P<uri>\S+)"
    r" (?P<status>\d+) (?P<bytes>\d+)B "
)


def basic(app_id: str, api_key: str) -> str:
    return "Authorization: Basic " + base64.b64encode(f"{app_id}:{api_key}".encode()).decode()


def challenge(headers: dict[str, str]) -> dict[str, str]:
    scheme, _, params = headers["www-authenticate"].partition(" ")
    assert scheme == "Bearer"
    return dict(re.findall(r'(\w+)="([^"]*)"', params))


def token_for(mirror: Dockmirror, app_id: str, api_key: str, *scopes: str) -> str:
    query = urlencode([("service", mirror.host), *(("scope", s) for s in scopes)])
    status, _, body = curl("-H", basic(app_id, api_key), f"{mirror.url}/docker-auth/token?{query}")
    assert status == 200, body
    return str(json.loads(body)["token"])


def test_docker_login_flow(mirror: Dockmirror) -> None:
    app_id, api_key = create_key(mirror, "laptop")
    status, headers, body = curl(f"{mirror.url}/v2/")
    assert status == 401 and error_code(body) == "UNAUTHORIZED"
    params = challenge(headers)
    assert params == {"realm": f"{mirror.url}/docker-auth/token", "service": mirror.host}
    # As docker login asks: Basic credentials, the account, an offline token.
    query = urlencode({"account": app_id, "client_id": "docker", "offline_token": "true"})
    status, headers, body = curl(
        "-H", basic(app_id, api_key), f"{params['realm']}?service={params['service']}&{query}"
    )
    assert status == 200 and headers["cache-control"] == "no-store"
    answer = json.loads(body)
    assert set(answer) == {"token", "access_token", "expires_in", "issued_at"}
    assert answer["expires_in"] == 300
    status, headers, body = curl(
        "-H", f"Authorization: Bearer {answer['token']}", f"{mirror.url}/v2/"
    )
    assert (status, body) == (200, b"{}")
    assert headers["docker-distribution-api-version"] == "registry/2.0"


def test_bad_login(mirror: Dockmirror) -> None:
    app_id, _ = create_key(mirror)
    for creds in (basic(app_id, "sk_wrong"), basic("app_nobody", "sk_x"), "Authorization: X"):
        status, _, body = curl("-H", creds, f"{mirror.url}/docker-auth/token?service={mirror.host}")
        assert status == 401
        assert error_code(body) == "UNAUTHORIZED"


def test_repository_challenge_names_the_scope(mirror: Dockmirror) -> None:
    status, headers, _ = curl(f"{mirror.url}/v2/library/alpine/manifests/latest")
    assert status == 401
    assert challenge(headers)["scope"] == "repository:library/alpine:pull"


def test_skopeo_pull_with_key_and_usage(
    mirror: Dockmirror, plain_registry: Registry, seeded: Seeder, unique_repo: str, tmp_path: Path
) -> None:
    image = seeded(plain_registry, unique_repo, layers=(200_000, 1000))
    app_id, api_key = create_key(mirror, "ci")
    pull(f"{mirror.host}/{unique_repo}:latest", tmp_path / "out", (app_id, api_key))
    assert_pulled(tmp_path / "out", image)
    # Every request the key made, with the bytes sent, from the access log.
    wanted = {f"/v2/{unique_repo}/blobs/{blob.digest}": blob.size for blob in image.blobs}
    wanted[f"/v2/{unique_repo}/manifests/latest"] = len(image.manifest)

    def logged() -> list[tuple[str, str, int]]:
        return [
            (m["method"], m["uri"], int(m["bytes"]))
            for m in ACCESS_LINE.finditer(mirror.log_text())
            if m["key"] == app_id
        ]

    wait_until(lambda: {uri for method, uri, _ in logged() if method == "GET"} >= set(wanted))
    requests = logged()
    for uri, size in wanted.items():
        assert [n for method, u, n in requests if u == uri and method == "GET"] == [size], uri
    expected = {"useCount": len(requests), "bytesServed": sum(n for _, _, n in requests)}

    def usage() -> dict[str, object]:
        key = list_keys(mirror)[app_id]
        return {name: key[name] for name in expected}

    # Usage is written every few seconds.
    wait_until(lambda: usage() == expected, timeout=15, interval=0.5)
    key = list_keys(mirror)[app_id]
    assert key["lastUsedAt"] is not None
    assert "apiKey" not in key and api_key not in json.dumps(key)
    status, _, body = curl(f"{mirror.url}/metrics")
    assert re.search(rb'dockmirror_auth_attempts_total\{result="success"\} [1-9]', body)


def test_skopeo_without_valid_key_fails(
    mirror: Dockmirror, plain_registry: Registry, seeded: Seeder, unique_repo: str, tmp_path: Path
) -> None:
    seeded(plain_registry, unique_repo)
    reference = f"{mirror.host}/{unique_repo}:latest"
    app_id, _ = create_key(mirror)
    revoked_id, revoked_key = create_key(mirror)
    admin(mirror, "keys", "revoke", revoked_id)
    for creds, message in (
        (None, "authentication required"),
        ((app_id, "sk_" + "A" * 43), "invalid appId or apiKey"),
        ((revoked_id, revoked_key), "invalid appId or apiKey"),
    ):
        with pytest.raises(SkopeoError) as info:
            pull(reference, tmp_path / "out", creds)
        assert "unauthorized" in info.value.stderr and message in info.value.stderr


def test_token_is_confined_to_its_scope(mirror: Dockmirror) -> None:
    app_id, api_key = create_key(mirror)
    token = token_for(mirror, app_id, api_key, "repository:team/a:pull")
    status, headers, _ = curl(
        "-H", f"Authorization: Bearer {token}", f"{mirror.url}/v2/team/b/tags/list"
    )
    assert status == 401
    params = challenge(headers)
    assert (params["scope"], params["error"]) == ("repository:team/b:pull", "insufficient_scope")
    # A signature made for other claims does not carry over.
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["access"][0]["name"] = "team/b"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    status, headers, _ = curl(
        "-H",
        f"Authorization: Bearer {header}.{forged}.{signature}",
        f"{mirror.url}/v2/team/b/tags/list",
    )
    assert status == 401 and challenge(headers)["error"] == "invalid_token"


def test_revocation_reaches_issued_tokens(mirror: Dockmirror) -> None:
    app_id, api_key = create_key(mirror)
    token = token_for(mirror, app_id, api_key)
    bearer = f"Authorization: Bearer {token}"
    assert curl("-H", bearer, f"{mirror.url}/v2/")[0] == 200
    admin(mirror, "keys", "revoke", app_id)
    wait_until(lambda: curl("-H", bearer, f"{mirror.url}/v2/")[0] == 401, timeout=15, interval=0.5)


def test_rotation(mirror: Dockmirror) -> None:
    app_id, api_key = create_key(mirror, "ci")
    rotated = json.loads(admin(mirror, "keys", "rotate", app_id).stdout)
    assert rotated["appId"] != app_id
    assert curl("-H", basic(app_id, api_key), f"{mirror.url}/v2/")[0] == 401
    assert curl("-H", basic(rotated["appId"], rotated["apiKey"]), f"{mirror.url}/v2/")[0] == 200
    listed = list_keys(mirror)
    assert listed[app_id]["revoked"] is True and listed[rotated["appId"]]["name"] == "ci"


def test_containerd_post_form(mirror: Dockmirror) -> None:
    app_id, api_key = create_key(mirror)
    form = urlencode(
        {
            "grant_type": "password",
            "username": app_id,
            "password": api_key,
            "service": mirror.host,
            "scope": "repository:team/a:pull repository:team/b:pull",
            "client_id": "containerd-client",
            "access_type": "offline",
        }
    )
    status, _, body = curl("-d", form, f"{mirror.url}/docker-auth/token")
    assert status == 200
    token = json.loads(body)["access_token"]
    for name in ("team/a", "team/b"):
        status, headers, body = curl(
            "-H", f"Authorization: Bearer {token}", f"{mirror.url}/v2/{name}/tags/list"
        )
        # Let in, and told by the upstream that there is no such repository.
        assert (status, error_code(body)) == (404, "NAME_UNKNOWN"), headers
    status, _, _ = curl("-H", f"Authorization: Bearer {token}", f"{mirror.url}/v2/team/c/tags/list")
    assert status == 401
    bad = form.replace(api_key, "sk_nope")
    assert curl("-d", bad, f"{mirror.url}/docker-auth/token")[0] == 401
    refresh = urlencode({"grant_type": "refresh_token", "refresh_token": "x"})
    assert curl("-d", refresh, f"{mirror.url}/docker-auth/token")[0] == 400


def test_throttling(mirror: Dockmirror) -> None:
    app_id, api_key = create_key(mirror)
    url = f"{mirror.url}/docker-auth/token?service={mirror.host}"
    for _ in range(10):
        assert curl("-H", basic(app_id, "sk_guess"), url)[0] == 401
    status, headers, body = curl("-H", basic(app_id, api_key), url)
    assert status == 429 and error_code(body) == "TOOMANYREQUESTS"
    assert 1 <= int(headers["retry-after"]) <= 60
    # Basic credentials straight to /v2 are throttled the same way.
    assert curl("-H", basic(app_id, api_key), f"{mirror.url}/v2/")[0] == 429


def test_database_holds_no_plaintext_key(mirror: Dockmirror) -> None:
    keys = [create_key(mirror, f"k{i}") for i in range(3)]
    for app_id, api_key in keys:
        assert curl("-H", basic(app_id, api_key), f"{mirror.url}/v2/")[0] == 200
    time.sleep(6)  # past a usage flush, so the server has written too
    state = mirror.database_path.parent
    files = [p for p in state.iterdir() if p.name.startswith(mirror.database_path.name)]
    raw = b"".join(p.read_bytes() for p in files)
    assert raw
    for app_id, api_key in keys:
        assert app_id.encode() in raw
        assert api_key.encode() not in raw and api_key[3:].encode() not in raw


def test_anonymous_repos(
    plain_registry: Registry,
    dockmirror: DockmirrorFactory,
    seeded: Seeder,
    unique_repo: str,
    tmp_path: Path,
) -> None:
    mirror = hub_mirror(dockmirror, plain_registry, anonymous_repos=[f"hub/{unique_repo}"])
    image = seeded(plain_registry, unique_repo)
    closed = seeded(plain_registry, unique_repo + "-closed")
    pull(f"{mirror.host}/{unique_repo}:latest", tmp_path / "open", None)
    assert_pulled(tmp_path / "open", image)
    with pytest.raises(SkopeoError, match="authentication required"):
        pull(f"{mirror.host}/{unique_repo}-closed:latest", tmp_path / "closed", None)
    app_id, api_key = create_key(mirror)
    pull(f"{mirror.host}/{unique_repo}-closed:latest", tmp_path / "closed", (app_id, api_key))
    assert_pulled(tmp_path / "closed", closed)
    assert curl(f"{mirror.url}/v2/")[0] == 401  # docker login still needs a key


def test_limited_key(
    mirror: Dockmirror,
    plain_registry: Registry,
    seeded: Seeder,
    unique_repo: str,
    tmp_path: Path,
) -> None:
    seeded(plain_registry, unique_repo)
    seeded(plain_registry, unique_repo + "-other")
    creds = create_key(mirror, "ci", "--repository", f"hub/{unique_repo}")
    pull(f"{mirror.host}/{unique_repo}:latest", tmp_path / "mine", creds)
    with pytest.raises(SkopeoError, match="denied"):
        pull(f"{mirror.host}/{unique_repo}-other:latest", tmp_path / "other", creds)


def test_usage_is_written_at_a_graceful_stop(mirror: Dockmirror) -> None:
    app_id, api_key = create_key(mirror, "short-lived")
    assert curl("-H", basic(app_id, api_key), f"{mirror.url}/v2/")[0] == 200
    mirror.stop()  # SIGTERM, well within the usage flush interval
    key = list_keys(mirror)[app_id]
    assert key["useCount"] == 1
    assert key["bytesServed"] == 2
