"""``/metrics`` answers HEAD itself, whatever bytes the request's URI holds."""

from twisted.web.test.requesthelper import DummyRequest

from dockmirror.metrics import Metrics, MetricsResource


def test_head_gets_the_length_and_no_body():
    request = DummyRequest([b"metrics"])
    request.method = b"HEAD"
    request.uri = b"/metrics?scope=\x9f"  # not ASCII: Twisted could not log the request
    body = MetricsResource(Metrics()).render(request)
    assert body == b"" and request.method == b"HEAD"
    [length] = request.responseHeaders.getRawHeaders("content-length")
    assert int(length) > 0
