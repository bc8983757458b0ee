"""``dockmirror-admin migrate``: a server's SQLite state copied into the cluster database.

In one transaction: every key (its appId, salt and hash as they are, so
that its apiKey keeps working), the usage counters and hourly traffic, the
portal's users (disabled ones stay disabled) and live sessions (by their
digests, as stored), and the secrets that sign tokens, session cookies and
CSRF tokens, so that tokens and portal sign-ins made by the server stay
valid on the cluster.  It copies only what the cluster lacks: a key, a
portal user or a secret the cluster holds already stays as it is (a key
revoked on the cluster stays revoked, a user disabled there stays disabled),
so that it may be run again, e.g. to bring over the portal's users later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg

from dockmirror.auth.keys import KeyStoreError
from dockmirror.auth.queries import KeyDump
from dockmirror.cluster.database import Database, DatabaseUnavailable, apply_schema
from dockmirror.cluster.keys import PostgresKeyDatabase, call_briefly
from dockmirror.cluster.portal import PostgresPortalDatabase, schema
from dockmirror.portal.sessions import PortalDump


@dataclass(frozen=True)
class Migrated:
    """What was copied, and what was not because the cluster held it already."""

    keys: int
    keys_skipped: int
    users: int
    users_skipped: int
    sessions: int
    #: For each secret offered: whether the cluster now uses it (False: it had its own).
    secrets: dict[str, bool]


def migrate(url: str, keys: KeyDump, portal: PortalDump, secrets: Mapping[str, bytes]) -> Migrated:
    """Copy *keys*, *portal* and *secrets* (by cluster secret name) into *url* (blocking)."""

    def copy(conn: psycopg.Connection[Any]) -> Migrated:
        apply_schema(conn, schema())
        with conn.transaction():
            key_store = PostgresKeyDatabase(conn)
            keys_copied = key_store.load(keys)
            users_copied = PostgresPortalDatabase(conn).load(portal)
            kept = {
                name: key_store.shared_secret(name, partial(bytes, value)) == value
                for name, value in secrets.items()
            }
        return Migrated(*keys_copied, *users_copied, kept)

    try:
        return call_briefly(url, copy, "dockmirror-admin")
    except (DatabaseUnavailable, psycopg.Error) as e:
        raise KeyStoreError(f"{Database(url, None)!r}: {str(e).strip()}") from None
