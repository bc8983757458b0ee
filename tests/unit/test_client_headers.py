"""Header handling that real clients depend on."""

from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from dockmirror.pull import _announced_length
from dockmirror.web import _accept


class _Response:
    def __init__(self, length: int, headers: dict[bytes, list[bytes]]) -> None:
        self.length = length
        self.headers = Headers(headers)


def test_accept_joins_every_header_line() -> None:
    """dockerd sends one Accept line per media type; all of them count."""
    request = DummyRequest([b"manifests", b"3"])
    request.requestHeaders.addRawHeader(b"Accept", b"application/vnd.oci.image.index.v1+json")
    request.requestHeaders.addRawHeader(b"Accept", b"application/vnd.oci.image.manifest.v1+json")
    assert _accept(request) == (
        "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"
    )


def test_accept_absent() -> None:
    assert _accept(DummyRequest([])) is None


def test_head_length_comes_from_the_content_length_header() -> None:
    """containerd refuses a HEAD answer announcing zero bytes."""
    response = _Response(0, {b"Content-Length": [b"1057"]})
    assert _announced_length(response, head=True) == 1057  # type: ignore[arg-type]


def test_get_length_is_the_body_length() -> None:
    assert _announced_length(_Response(2255, {}), head=False) == 2255  # type: ignore[arg-type]
