"""Secrets stay secret: apiKeys, upstream passwords and tokens never show.

One mirror with required keys and two upstreams that need credentials (Basic
on one, a token service on the other) is used the way clients use it, right
and wrong.  Then everything it let out is searched for every secret the run
used: its log, ``/metrics``, every response (headers and bodies) and what the
SSH manhole prints.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import pytest

from .conftest import Dockmirror, DockmirrorFactory, Seeder
from .images import pull
from .keys import create_key
from .registries import LOOPBACK, Registry, TokenServer, free_port
from .test_manhole import Session, keypair
from .test_pull import curl


@dataclass
class Secrets:
    """Every secret of the run, and everything the mirror let out."""

    values: set[str] = field(default_factory=set)
    seen: list[str] = field(default_factory=list)

    def add(self, *values: str) -> None:
        for value in values:
            self.values.add(value)
            self.values.add(base64.b64encode(value.encode()).decode())

    def add_login(self, user: str, password: str) -> None:
        self.add(password)
        self.values.add(base64.b64encode(f"{user}:{password}".encode()).decode())

    def curl(self, *args: str) -> tuple[int, dict[str, str], bytes]:
        status, headers, body = curl(*args)
        self.seen.append(json.dumps(headers) + body.decode("utf-8", "replace"))
        return status, headers, body

    def leaks(self, text: str) -> list[str]:
        return sorted(value for value in self.values if value in text)


@dataclass
class Setup:
    mirror: Dockmirror
    secrets: Secrets
    manhole_port: int
    authorized_keys: Path
    keys: list[tuple[str, str]]
    repos: dict[str, str]
    token_server: TokenServer


@pytest.fixture
def setup(dockmirror: DockmirrorFactory, seeded: Seeder, tmp_path: Path) -> Iterator[Setup]:
    found = Secrets()
    basic_user, basic_password = "corp-user", "pw-" + secrets.token_urlsafe(16)
    token_user, token_password = "hub-user", "pw-" + secrets.token_urlsafe(16)
    found.add_login(basic_user, basic_password)
    found.add_login(token_user, token_password)
    for directory in ("tokens", "corp", "hub"):
        (tmp_path / directory).mkdir()
    with (
        TokenServer(
            tmp_path / "tokens", credentials=(token_user, token_password), anonymous_pull=False
        ) as token_server,
        Registry(tmp_path / "corp", "htpasswd", credentials=(basic_user, basic_password)) as corp,
        Registry(tmp_path / "hub", "token", token_server=token_server) as hub,
    ):
        issue = token_server.issue

        def recorded(username: str | None, scopes: list[str]) -> str:
            token = issue(username, scopes)
            found.add(token)
            return token

        token_server.issue = recorded  # type: ignore[method-assign]
        seeded(corp, "team/app", "v1")
        seeded(hub, "library/alpine", "3")
        manhole_port = free_port()
        authorized = tmp_path / "authorized_keys"
        authorized.write_text("")
        mirror = dockmirror(
            {
                "hub": {
                    "plugin": "dockerhub",
                    "url": hub.url,
                    "default": True,
                    "username": token_user,
                    "password": token_password,
                    "token_realms": [token_server.origin],
                },
                "corp": {
                    "plugin": "registry",
                    "url": corp.url,
                    "aliases": ["corp.example"],
                    "username": basic_user,
                    "password": basic_password,
                },
            },
            auth_required=True,
            extra={
                "manhole": {
                    "listen": f"tcp:{manhole_port}:interface={LOOPBACK}",
                    "authorized_keys": str(authorized),
                }
            },
            tls=True,
        )
        keys = [create_key(mirror, "first"), create_key(mirror, "second")]
        for _, api_key in keys:
            found.add(api_key)
        yield Setup(
            mirror,
            found,
            manhole_port,
            authorized,
            keys,
            {"hub": "library/alpine:3", "corp": "corp.example/team/app:v1"},
            token_server,
        )


def use_the_mirror(setup: Setup, tmp_path: Path) -> None:
    """Pulls, logins and mistakes, as clients make them."""
    mirror, found = setup.mirror, setup.secrets
    (app_id, api_key), (other_id, other_key) = setup.keys
    for name, reference in setup.repos.items():
        pull(
            f"{mirror.host}/{reference}",
            tmp_path / f"pulled-{name}",
            (app_id, api_key),
            cert_dir=mirror.cert_dir,
        )
    basic = base64.b64encode(f"{app_id}:{api_key}".encode()).decode()
    query = urlencode([("service", mirror.host), ("scope", "repository:library/alpine:pull")])
    status, _, body = curl(  # the token is its answer
        "-H", f"Authorization: Basic {basic}", f"{mirror.url}/docker-auth/token?{query}"
    )
    assert status == 200
    token = json.loads(body)["token"]
    found.add(token)
    form = urlencode(
        {
            "grant_type": "password",
            "username": other_id,
            "password": other_key,
            "service": mirror.host,
        }
    )
    status, _, body = curl("-d", form, f"{mirror.url}/docker-auth/token")  # the token is its answer
    assert status == 200
    found.add(json.loads(body)["access_token"])
    bearer = f"Authorization: Bearer {token}"
    assert found.curl("-H", bearer, f"{mirror.url}/v2/library/alpine/manifests/3")[0] == 200
    assert found.curl("-H", bearer, f"{mirror.url}/v2/library/other/manifests/3")[0] == 401
    assert found.curl("-H", f"Authorization: Basic {basic}", f"{mirror.url}/v2/")[0] == 200
    # Mistakes: a near miss of a real key, a tampered token, a password in the wrong place.
    near_miss = api_key + "x"
    wrong = base64.b64encode(f"{app_id}:{near_miss}".encode()).decode()
    assert found.curl("-H", f"Authorization: Basic {wrong}", f"{mirror.url}/v2/")[0] == 401
    assert found.curl("-H", f"Authorization: Bearer {token}x", f"{mirror.url}/v2/")[0] == 401
    bad_form = form.replace(other_key, near_miss)
    assert found.curl("-d", bad_form, f"{mirror.url}/docker-auth/token")[0] == 401
    found.seen.append(found.curl(f"{mirror.url}/metrics")[2].decode())


def test_no_secret_in_logs_metrics_or_answers(setup: Setup, tmp_path: Path) -> None:
    use_the_mirror(setup, tmp_path)
    setup.mirror.stop()
    assert setup.secrets.leaks(setup.mirror.log_text()) == []
    for text in setup.secrets.seen:
        assert setup.secrets.leaks(text) == [], text[:500]
    # The upstream's tokens were really fetched with its password, so were there to leak.
    assert any(r.username == "hub-user" for r in setup.token_server.requests)


def test_no_secret_in_the_manhole(setup: Setup, tmp_path: Path) -> None:
    use_the_mirror(setup, tmp_path)
    operator = keypair(tmp_path, "operator")
    setup.authorized_keys.write_text(Path(f"{operator}.pub").read_text())
    session = Session(setup.manhole_port, operator)
    try:
        session.expect(">>> ")
        for expression in ("keys", "keys.list()", "upstreams", "config", "cache", "cache.stats()"):
            session.send(expression)
        session.send("'done' + '!'")
        session.expect("done!")
    finally:
        session.close()
    assert "upstream hub" in session.text
    assert setup.secrets.leaks(session.text) == []


def test_no_secret_from_a_token_query_string_in_the_log(setup: Setup) -> None:
    mirror = setup.mirror
    app_id, api_key = setup.keys[0]
    query = urlencode({"grant_type": "password", "username": app_id, "password": api_key})
    curl("-X", "POST", f"{mirror.url}/docker-auth/token?{query}")
    mirror.stop()
    assert setup.secrets.leaks(mirror.log_text()) == []
