"""What the access log and the request metrics take from a request."""

from dockmirror.web import ROUTES, loggable_uri, method_label, route_label


def test_route_labels_come_from_a_fixed_set() -> None:
    assert route_label(b"/v2/") == route_label(b"/v2") == "base"
    assert route_label(b"/v2/library/alpine/manifests/3") == "manifest"
    assert route_label(b"/v2/a/b/c/blobs/sha256:00?ns=docker.io") == "blob"
    assert route_label(b"/v2/alpine/tags/list?n=10") == "tags"
    assert route_label(b"/v2/a/referrers/sha256:00?artifactType=a/b") == "referrers"
    assert route_label(b"/docker-auth/token?service=x") == "token"
    assert route_label(b"/metrics") == "metrics"
    assert route_label(b"/healthz/") == "healthz"
    for path in (
        b"/",
        b"/v2/_catalog",
        b"/v2/manifests/x",
        b"/metricsX",
        b"/docker-auth",
        b"//v2/",
    ):
        assert route_label(path) == "other", path
    assert ROUTES[-1] == "other"
    assert {route_label(p) for p in (b"/v2/", b"/v2/a/tags/list", b"/metrics", b"/x")} <= set(
        ROUTES
    )


def test_unknown_methods_are_other() -> None:
    assert method_label(b"GET") == "GET"
    assert method_label(b"get") == method_label(b"PROPFIND") == method_label(b"\xff") == "other"


def test_credentials_in_queries_are_masked() -> None:
    assert loggable_uri(b"/v2/x/tags/list?n=5&last=a") == "/v2/x/tags/list?n=5&last=a"
    assert (
        loggable_uri(b"/docker-auth/token?username=app&password=sk_1&Pass%77ord=sk_2&scope=s")
        == "/docker-auth/token?username=app&password=***&Pass%77ord=***&scope=s"
    )
    assert loggable_uri(b"/t?refresh_token=a&client_secret=b&token&x=") == (
        "/t?refresh_token=***&client_secret=***&token&x="
    )
    assert len(loggable_uri(b"/" + b"a" * 1000)) == 500
