"""The pieces of the cluster's cache that need no PostgreSQL: keys, ranges, the secret file."""

from __future__ import annotations

import pytest
from twisted.web.http_headers import Headers

from dockmirror.cluster.coordinator import lock_key
from dockmirror.cluster.peers import NODE_URL_RE, SecretError, read_secret_file
from dockmirror.streaming import content_range_start

DIGEST = "sha256:" + "0123456789abcdef" * 4


def test_lock_keys_come_from_the_digest_and_stay_clear_of_hashtext_keys():
    assert lock_key(DIGEST) == int("0123456789abcde", 16) | 1 << 60
    assert lock_key("sha256:" + "0" * 64) >= 1 << 60 > 2**31  # hashtext() is 32 bits
    assert lock_key("sha256:" + "f" * 64) < 2**63  # a bigint


class Answer:
    def __init__(self, *content_range: bytes) -> None:
        self.headers = Headers({b"content-range": list(content_range)} if content_range else {})


@pytest.mark.parametrize(
    ("header", "start"),
    [
        ((b"bytes 100-999/1000",), 100),
        ((b"bytes 0-999/1000",), 0),
        ((b"bytes 100-998/1000",), None),  # not the rest
        ((b"bytes 100-999/1001",), None),  # another size
        ((b"bytes 100-999/*",), None),
        ((b"bytes */1000",), None),
        ((), None),
    ],
)
def test_a_partial_answer_must_be_the_rest_of_the_blob(header, start):
    assert content_range_start(Answer(*header), 1000) == start  # type: ignore[arg-type]


def test_the_secret_file_holds_one_long_enough_line(tmp_path):
    path = tmp_path / "secret"
    path.write_text("  a-secret-of-the-cluster  \n")
    assert read_secret_file(str(path)) == "a-secret-of-the-cluster"
    for bad in ("short\n", "two\nlines-of-a-long-secret\n", ""):
        path.write_text(bad)
        with pytest.raises(SecretError):
            read_secret_file(str(path))
    with pytest.raises(SecretError, match="cluster.secret_file"):
        read_secret_file(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://10.0.0.5:5001", True),
        ("https://node-2.internal", True),
        ("http://[::1]:5001", True),
        ("http://10.0.0.5:5001/path", False),
        ("http://user@10.0.0.5", False),
        ("file:///etc/passwd", False),
        ("http://a" + "a" * 400, False),
    ],
)
def test_node_urls_from_the_database_are_checked_before_use(url, ok):
    assert bool(NODE_URL_RE.fullmatch(url)) is ok
