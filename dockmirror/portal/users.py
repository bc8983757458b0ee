"""Disabling a portal user: their keys are revoked and their sessions end.

Used by ``dockmirror-admin users`` (on the databases directly) and by the
manhole's ``users`` (through the running server's stores, so that revoked
bearer tokens stop working at once in that process).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from dockmirror.auth.keystore import KeyStore
from dockmirror.auth.queries import KeyQueries
from dockmirror.portal.config import IDENTITY_RE, normalize_identity
from dockmirror.portal.sessions import PortalQueries, PortalStore

audit = Logger(namespace="dockmirror.audit")


def check_identity(identity: str) -> str:
    """*identity* checked and normalized (``github:Octocat`` is ``github:octocat``)."""
    if not IDENTITY_RE.fullmatch(identity):
        raise ValueError(f"{identity!r} is not an identity such as github:octocat or oidc:SUBJECT")
    return normalize_identity(identity)


def disable(portal_db: PortalQueries, keys: KeyQueries, identity: str) -> dict[str, Any]:
    """Disable *identity* in the databases themselves (``dockmirror-admin``)."""
    identity = check_identity(identity)
    sessions = portal_db.set_disabled(identity, True)
    revoked = keys.revoke_owner(identity)
    return {"identity": identity, "sessionsEnded": sessions, "keysRevoked": revoked}


async def disable_user(
    store: PortalStore, keys: KeyStore, identity: str, actor: str, client: str = "-"
) -> dict[str, Any]:
    """Disable *identity* through the running server's stores."""
    identity = check_identity(identity)
    sessions = await store.run(PortalQueries.set_disabled, identity, True)
    revoked = await keys.revoke_owner(identity)
    audit.info(
        "user {identity} disabled by {actor} from {client}: {count} keys revoked,"
        " {sessions} sessions ended",
        identity=identity,
        actor=actor,
        client=client,
        count=len(revoked),
        sessions=sessions,
        audit="user-disabled",
    )
    return {"identity": identity, "sessionsEnded": sessions, "keysRevoked": revoked}


class UsersConsole:
    """``users`` at the manhole prompt."""

    def __init__(self, store: PortalStore, keys: KeyStore) -> None:
        self._store = store
        self._keys = keys

    def list(self) -> Deferred[list[Any]]:
        """Everyone who signed in once, and who is disabled."""
        return Deferred.fromCoroutine(self._store.run(PortalQueries.users))

    def disable(self, identity: str) -> Deferred[dict[str, Any]]:
        """Revoke every key of *identity*, end their sessions, refuse their sign-ins."""
        return Deferred.fromCoroutine(
            disable_user(self._store, self._keys, identity, "the operator (manhole)")
        )

    def enable(self, identity: str) -> Deferred[int]:
        """Let *identity* sign in again (their revoked keys stay revoked)."""
        return Deferred.fromCoroutine(
            self._store.run(PortalQueries.set_disabled, check_identity(identity), False)
        )

    def __repr__(self) -> str:
        return "<users: list(), disable(identity), enable(identity)>"
