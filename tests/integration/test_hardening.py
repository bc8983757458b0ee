"""What an attacker or an operator can do to the running server: metric labels,
login throttling, client addresses behind proxies, reload, TLS and config checks."""

from __future__ import annotations

import http.client
import random
import re
import string

import pytest

from .conftest import Dockmirror, DockmirrorFactory
from .registries import LOOPBACK, Registry
from .test_pull import curl


@pytest.fixture
def hub(plain_registry: Registry, dockmirror: DockmirrorFactory) -> Dockmirror:
    return dockmirror({"hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True}})


def _random_path(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + "-._~%:@!$&'()*+,;="
    segments = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        for _ in range(rng.randint(1, 5))
    ]
    prefix = rng.choice(["", "v2/", "v2/x/", "docker-auth/", "metrics/"])
    return "/" + prefix + "/".join(segments) + rng.choice(["", "/", "?q=" + segments[0]])


def test_metric_labels_stay_bounded(hub: Dockmirror) -> None:
    rng = random.Random(9)
    methods = ["GET", "HEAD", "POST", "DELETE", "PROPFIND", "BREW", "M-SEARCH", "get"]
    connection = http.client.HTTPConnection(LOOPBACK, hub.port, timeout=10)
    for i in range(1000):
        method = rng.choice(methods) if i % 3 else "X" + "".join(rng.choices("ABCDEFGH", k=8))
        try:
            connection.request(method, _random_path(rng))
            connection.getresponse().read()
        except (http.client.HTTPException, OSError):
            connection.close()
            connection = http.client.HTTPConnection(LOOPBACK, hub.port, timeout=10)
    connection.close()
    status, _, body = curl(f"{hub.url}/metrics")
    assert status == 200
    series = re.findall(
        r'^dockmirror_http_requests_total\{method="([^"]*)",route="([^"]*)",status="([^"]*)"\}',
        body.decode(),
        re.MULTILINE,
    )
    routes = {route for _, route, _ in series}
    methods_seen = {method for method, _, _ in series}
    assert routes <= {"base", "manifest", "blob", "tags", "token", "metrics", "healthz", "other"}
    assert methods_seen <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    assert "other" in methods_seen and "other" in routes
    assert len(series) < 60, series
