"""API keys as the key store gives them, and the errors and limits of the store.

A key is an appId (public) and an apiKey (its secret, known only when the
key is made); :class:`KeyInfo` is what is listed of it, never its secret.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

#: The owner of keys made by ``dockmirror-admin`` and the manhole.
OPERATOR = "operator"
APP_ID_PREFIX = "app_"
API_KEY_PREFIX = "sk_"
APP_ID_ALPHABET = string.ascii_lowercase + string.digits
APP_ID_LENGTH = 20  # 103 random bits: unguessable, though not a secret
APP_ID_RE = re.compile(rf"{APP_ID_PREFIX}[{APP_ID_ALPHABET}]{{{APP_ID_LENGTH}}}")
#: Credentials longer than this are refused before any hashing.
MAX_CREDENTIAL_LENGTH = 256
NAME_MAX = 100
DAY = 86400
HOUR = 3600


class KeyStoreError(Exception):
    """A key-store operation cannot be done; the message says why."""


#: ``(appId, day, requests, bytes)``, the day counted from the epoch.
DailyUsage = tuple[str, int, int, int]


class QuotaExceeded(KeyStoreError):
    """The owner already has as many live keys as allowed."""


def iso_time(timestamp: float) -> str:
    """``2024-05-01T12:00:00Z``."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso(timestamp: int | None) -> str | None:
    return iso_time(timestamp) if timestamp is not None else None


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


@dataclass(frozen=True)
class KeyInfo:
    """One key as listed: never its secret."""

    app_id: str
    name: str
    created_at: int
    revoked_at: int | None
    last_used_at: int | None
    use_count: int
    bytes_served: int
    #: ``UPSTREAM/PREFIX`` rules this key may pull from; None: everything.
    repositories: tuple[str, ...] | None
    replaced_by: str | None
    #: A portal identity (``github:octocat``), or :data:`OPERATOR`.
    owner: str = OPERATOR

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "appId": self.app_id,
            "name": self.name,
            "owner": self.owner,
            "createdAt": _iso(self.created_at),
            "lastUsedAt": _iso(self.last_used_at),
            "useCount": self.use_count,
            "bytesServed": self.bytes_served,
            "revoked": self.revoked,
            "revokedAt": _iso(self.revoked_at),
            "replacedBy": self.replaced_by,
            "repositories": list(self.repositories) if self.repositories is not None else None,
        }

    def __repr__(self) -> str:
        state = f"revoked {_iso(self.revoked_at)}" if self.revoked else "active"
        scope = "" if self.repositories is None else f" only {','.join(self.repositories)}"
        owner = "" if self.owner == OPERATOR else f" of {self.owner}"
        return (
            f"<key {self.app_id} {self.name!r}{owner} {state}{scope}: {self.use_count} requests,"
            f" {_size(self.bytes_served)}, last used {_iso(self.last_used_at) or 'never'}>"
        )


class KeyList(list[KeyInfo]):
    """Keys, shown as a table at the manhole prompt."""

    def __repr__(self) -> str:
        lines = [f"{len(self)} keys"]
        lines.extend(repr(key) for key in self)
        return "\n".join(lines)


@dataclass(frozen=True)
class NewKey:
    """A key just made: the only time its apiKey is known."""

    app_id: str
    api_key: str
    name: str

    def to_json(self) -> dict[str, str]:
        return {"appId": self.app_id, "apiKey": self.api_key}

    def __repr__(self) -> str:
        return f"<new key {self.name!r}: appId {self.app_id} apiKey {self.api_key}>"


@dataclass
class Usage:
    """Usage of one key not yet written to the database."""

    requests: int = 0
    bytes: int = 0
    last_used: int = 0

    def add(self, requests: int, nbytes: int, last_used: int) -> None:
        self.requests += requests
        self.bytes += nbytes
        self.last_used = max(self.last_used, last_used)
