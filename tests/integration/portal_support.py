"""Portal test fixtures: the identity-provider stand-in, a portal mirror, sign-in over HTTP."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
import requests

from .conftest import REPO_ROOT, Dockmirror, DockmirrorFactory
from .idp import GITHUB_CLIENT, OIDC_CLIENT
from .registries import LOOPBACK, ManagedProcess, Registry, free_port, subprocess_env

pytest.importorskip("authlib")


class IdentityProvider:
    """``tests/integration/idp.py`` in its own process on 127.0.0.1."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self._process = ManagedProcess(
            [sys.executable, "-m", "tests.integration.idp", "--port", str(self.port)],
            log_path=workdir / "idp.log",
            cwd=REPO_ROOT,
            env=subprocess_env(
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.getenv("PYTHONPATH")])),
                AUTHLIB_INSECURE_TRANSPORT="1",  # plain HTTP on loopback
                PYTHONUNBUFFERED="1",
            ),
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def __enter__(self) -> Self:
        self._process.start(f"{self.url}/_ready", timeout=30.0)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop answering, as a provider that is down."""
        self._process.stop()

    def id_tokens(self, mode: str) -> None:
        """Make the issuer's next ID tokens ``good``, ``wrong-audience`` or ``wrong-signature``."""
        requests.post(f"{self.url}/_control", json={"id_token": mode}, timeout=5).raise_for_status()

    def log_text(self) -> str:
        return self._process.log_text()

    def portal_config(self, **portal: Any) -> dict[str, Any]:
        """A ``[portal]`` table using this stand-in for GitHub and OIDC."""
        return {
            "enabled": True,
            **portal,
            "login": {
                "github": {
                    "client_id": GITHUB_CLIENT[0],
                    "client_secret": GITHUB_CLIENT[1],
                    "authorize_url": f"{self.url}/login/oauth/authorize",
                    "token_url": f"{self.url}/login/oauth/access_token",
                    "api_url": f"{self.url}/api",
                },
                "oidc": {
                    "issuer": f"{self.url}/oidc",
                    "client_id": OIDC_CLIENT[0],
                    "client_secret": OIDC_CLIENT[1],
                    "label": "Company SSO",
                },
            },
        }


@pytest.fixture
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityProvider]:
    with IdentityProvider(tmp_path_factory.mktemp("idp")) as provider:
        yield provider


def portal_mirror(
    dockmirror: DockmirrorFactory, registry: Registry, idp: IdentityProvider, **portal: Any
) -> Dockmirror:
    """A mirror requiring keys, its portal signing in through *idp*."""
    return dockmirror(
        {"hub": {"plugin": "dockerhub", "url": registry.url, "default": True}},
        auth_required=True,
        extra={"portal": idp.portal_config(**portal)},
    )


def start_sign_in(mirror: Dockmirror, provider: str = "github") -> tuple[requests.Session, str]:
    """A fresh browser-like session, sent to the provider: ``(session, authorize URL)``."""
    session = requests.Session()
    session.trust_env = False  # never an environment proxy for loopback
    response = session.get(f"{mirror.url}/portal/login/{provider}", allow_redirects=False)
    assert response.status_code == 302, response.text
    return session, response.headers["location"]


def authorize(session: requests.Session, authorize_url: str, login: str, orgs: str = "") -> str:
    """Sign in at the stand-in as *login*: the callback URL it sends the browser to."""
    page = session.get(authorize_url)
    assert page.status_code == 200, page.text
    fields = dict(re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', page.text))
    fields = {k: v.replace("&amp;", "&") for k, v in fields.items()}
    answer = session.post(
        authorize_url.split("?")[0],
        data={**fields, "login": login, "orgs": orgs},
        allow_redirects=False,
    )
    assert answer.status_code == 302, answer.text
    return str(answer.headers["location"])


def sign_in(
    mirror: Dockmirror, login: str, provider: str = "github", orgs: str = ""
) -> requests.Session:
    """A session signed in to the portal as *login*."""
    session, url = start_sign_in(mirror, provider)
    callback = authorize(session, url, login, orgs)
    done = session.get(callback, allow_redirects=False)
    assert done.status_code == 303, done.text
    return session


def csrf(session: requests.Session, mirror: Dockmirror) -> str:
    answer = session.get(f"{mirror.url}/portal/api/session")
    assert answer.status_code == 200, answer.text
    return str(answer.json()["csrfToken"])
