"""The ``[portal]`` configuration section and its checks.

Plain dataclasses, read by :mod:`dockmirror.config` like every section;
:func:`check` adds the rules that span keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

#: ``PROVIDER:LOGIN``, as in ``admins`` and ``allowed_users``.
IDENTITY_RE = re.compile(r"(github|oidc):\S{1,200}")
GITHUB_ORG_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})")


def normalize_identity(identity: str) -> str:
    """The identity as the portal records it: GitHub logins in lower case (OIDC subjects as is)."""
    provider, _, login = identity.partition(":")
    return f"{provider}:{login.lower()}" if provider == "github" else identity


@dataclass(frozen=True)
class GitHubLoginConfig:
    """An OAuth app on GitHub or GitHub Enterprise."""

    client_id: str
    client_secret: str | None = None
    client_secret_file: str | None = None
    authorize_url: str = "https://github.com/login/oauth/authorize"
    token_url: str = "https://github.com/login/oauth/access_token"
    #: API paths are appended: GitHub Enterprise's is ``https://HOST/api/v3``.
    api_url: str = "https://api.github.com"

    def __repr__(self) -> str:
        return f"GitHubLoginConfig(client_id={self.client_id!r}, api_url={self.api_url!r})"


@dataclass(frozen=True)
class OidcLoginConfig:
    """A client of an OpenID Connect issuer."""

    issuer: str
    client_id: str
    client_secret: str | None = None
    client_secret_file: str | None = None
    #: What the sign-in button says.
    label: str = "OpenID Connect"

    def __repr__(self) -> str:
        return f"OidcLoginConfig(issuer={self.issuer!r}, client_id={self.client_id!r})"


@dataclass(frozen=True)
class LoginConfig:
    github: GitHubLoginConfig | None = None
    oidc: OidcLoginConfig | None = None


@dataclass(frozen=True)
class PortalConfig:
    enabled: bool = False
    #: Identities that also see the operator views.
    admins: tuple[str, ...] = ()
    max_keys_per_user: int = 5
    #: Identities who may sign in; with allowed_orgs empty too: anyone.
    allowed_users: tuple[str, ...] = ()
    #: GitHub organisations whose members may sign in.
    allowed_orgs: tuple[str, ...] = ()
    #: Seconds a sign-in lasts.
    session_ttl: int = 12 * 3600
    login: LoginConfig = field(default_factory=LoginConfig)

    @property
    def restricted(self) -> bool:
        """Whether only some identities may sign in."""
        return bool(self.allowed_users or self.allowed_orgs)


def client_secret(login: GitHubLoginConfig | OidcLoginConfig) -> str:
    """The client secret, from ``client_secret_file`` if so given (ValueError if unreadable)."""
    if login.client_secret_file is not None:
        try:
            secret = Path(login.client_secret_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {login.client_secret_file}: {e}") from None
        if not secret:
            raise ValueError(f"{login.client_secret_file} is empty")
        return secret
    assert login.client_secret is not None  # check() guarantees one of the two
    return login.client_secret


def check(portal: PortalConfig) -> None:
    """Rules that span keys; raises ValueError naming the key."""
    for key in ("admins", "allowed_users"):
        for identity in getattr(portal, key):
            if not IDENTITY_RE.fullmatch(identity):
                raise ValueError(
                    f"portal.{key}: {identity!r} is not an identity such as"
                    ' "github:octocat" or "oidc:SUBJECT"'
                )
    for org in portal.allowed_orgs:
        if not GITHUB_ORG_RE.fullmatch(org):
            raise ValueError(f"portal.allowed_orgs: {org!r} is not a GitHub organisation name")
    if portal.allowed_orgs and portal.login.github is None:
        raise ValueError("portal.allowed_orgs needs [portal.login.github]")
    if portal.max_keys_per_user < 1:
        raise ValueError("portal.max_keys_per_user must be 1 or more")
    if not 60 <= portal.session_ttl <= 30 * 86400:
        raise ValueError("portal.session_ttl must be between 60 seconds and 30 days")
    for name in ("github", "oidc"):
        login = getattr(portal.login, name)
        if login is None:
            continue
        if (login.client_secret is None) == (login.client_secret_file is None):
            raise ValueError(
                f"portal.login.{name}: give one of client_secret and client_secret_file"
            )
        urls = (
            [login.authorize_url, login.token_url, login.api_url]
            if isinstance(login, GitHubLoginConfig)
            else [login.issuer]
        )
        for url in urls:
            if not url.startswith(("https://", "http://")):
                raise ValueError(f"portal.login.{name}: {url!r} is not an http(s) URL")
    if portal.enabled and portal.login.github is None and portal.login.oidc is None:
        raise ValueError(
            "portal.enabled needs a sign-in provider: [portal.login.github] or [portal.login.oidc]"
        )
