"""Bearer tokens as the distribution token spec has them: signed JWTs.

Tokens are ES256 JWTs made and checked with PyJWT.  The signing key is made
on first start and kept in the state directory; only this mirror checks its
tokens.  The audience is the service (the mirror's host); the ``access`` claim
lists the repositories granted, with ``pull`` as the only action ever granted.
A token of a key limited to some repositories also carries those limits.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.interfaces import IReactorTime

from dockmirror.auth.keys import iso_time
from dockmirror.auth.secretfile import load_or_create
from dockmirror.reference import NAME_MAX, NAME_RE

#: The token signing key, in the state directory.
SIGNING_KEY_FILE = "token_signing_key.pem"
ALGORITHM = "ES256"
PULL = "pull"
#: Repositories one token request may ask for; more are ignored.
MAX_SCOPES = 64
#: Longest token looked at; ours are well under 2 kB plus the scopes.
MAX_TOKEN_LENGTH = 32 * 1024
#: Clock skew tolerated on ``nbf`` (several mirrors may share a signing key).
LEEWAY = 30
_LIMITS_CLAIM = "repositories"


class InvalidToken(Exception):
    """A bearer token that is not acceptable; the message says why."""


def generate_signing_key() -> bytes:
    """A new P-256 private key, as PEM."""
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def parse_signing_key(pem: bytes, source: str) -> ec.EllipticCurvePrivateKey:
    """The P-256 private key in *pem*, from *source* (named in errors)."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{source}: not a P-256 private key")
    return key


def load_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The P-256 signing key at *path*, made (mode 0600) if there is none."""
    return parse_signing_key(load_or_create(path, generate_signing_key), str(path))


def requested_repositories(scopes: Iterable[str]) -> list[str]:
    """The repositories that ``scope`` parameters ask to pull, in order, once each.

    Each value may hold several space-separated scopes (the OAuth2 form) as
    ``repository:NAME:ACTIONS``; anything else, and any invalid name, is not
    granted and so left out.
    """
    names: dict[str, None] = {}
    for value in scopes:
        for scope in value.split():
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if (
                kind == "repository"
                and PULL in actions.split(",")
                and len(name) <= NAME_MAX
                and NAME_RE.fullmatch(name)
            ):
                names[name] = None
    return list(names)[:MAX_SCOPES]


@dataclass(frozen=True)
class Claims:
    """What a verified token says."""

    subject: str | None  # the appId; None for an anonymous token
    repositories: frozenset[str]  # client-facing names granted for pull
    limits: tuple[str, ...] | None  # UPSTREAM/PREFIX rules; None: no limits


class TokenService:
    """Issues and verifies the mirror's bearer tokens."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        issuer: str,
        service: str,
        ttl: int,
        clock: IReactorTime,
    ) -> None:
        self._key = key
        self._public = key.public_key()
        self.issuer = issuer
        self.service = service
        self.ttl = ttl
        self._clock = clock

    def issue(
        self, subject: str | None, repositories: Sequence[str], limits: Sequence[str] | None
    ) -> dict[str, Any]:
        """A token response body granting pull on *repositories* to *subject*."""
        now = int(self._clock.seconds())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject or "",
            "aud": self.service,
            "iat": now,
            "nbf": now,
            "exp": now + self.ttl,
            "jti": secrets.token_urlsafe(16),
            "access": [
                {"type": "repository", "name": name, "actions": [PULL]} for name in repositories
            ],
        }
        if limits is not None:
            claims[_LIMITS_CLAIM] = list(limits)
        token = jwt.encode(claims, self._key, algorithm=ALGORITHM)
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.ttl,
            "issued_at": iso_time(now),
        }

    def verify(self, token: str) -> Claims:
        """The claims of a valid, unexpired token of ours; else :class:`InvalidToken`."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("token too long")
        try:
            claims = jwt.decode(
                token,
                self._public,
                algorithms=[ALGORITHM],
                audience=self.service,
                issuer=self.issuer,
                # Times are checked below against the injectable clock.
                options={
                    "require": ["exp", "nbf", "iat", "aud", "iss", "sub"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as e:
            raise InvalidToken(str(e)) from None
        now = self._clock.seconds()
        expires, not_before = claims["exp"], claims["nbf"]
        if not all(isinstance(t, int | float) for t in (expires, not_before)):
            raise InvalidToken("malformed time claims")
        if now >= expires:
            raise InvalidToken("token expired")
        if now + LEEWAY < not_before:
            raise InvalidToken("token not yet valid")
        return Claims(
            subject=str(claims["sub"]) or None,
            repositories=frozenset(_granted(claims.get("access"))),
            limits=_limits(claims.get(_LIMITS_CLAIM)),
        )


def _granted(access: Any) -> Iterable[str]:
    if not isinstance(access, list):
        return
    for entry in access:
        if (
            isinstance(entry, dict)
            and entry.get("type") == "repository"
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("actions"), list)
            and PULL in entry["actions"]
        ):
            yield entry["name"]


def _limits(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidToken("malformed repository limits")
    return tuple(value)
