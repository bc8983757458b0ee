"""``dockmirror-admin migrate``: a server's SQLite state copied into the cluster database.

In one transaction: every key (its appId, salt and hash as they are, so
that its apiKey keeps working), the usage counters and hourly traffic, the
portal's users (disabled ones stay disabled) and live sessions (by their
digests, as stored), and the secrets that sign tokens, session cookies and
CSRF tokens, so that tokens and portal sign-ins made by the server stay
valid on the cluster.  It refuses a database that already holds keys or
portal users.
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
    """What was copied."""

    keys: int
    users: int
    sessions: int
    #: For each secret offered: whether the cluster now uses it (False: it had its own).
    secrets: dict[str, bool]


def migrate(url: str, keys: KeyDump, portal: PortalDump, secrets: Mapping[str, bytes]) -> Migrated:
    """Copy *keys*, *portal* and *secrets* (by cluster secret name) into *url* (blocking)."""

    def copy(conn: psycopg.Connection[Any]) -> Migrated:
        apply_schema(conn, schema())
        with conn.transaction():
            key_store = PostgresKeyDatabase(conn)
            copied = key_store.load(keys)
            users = PostgresPortalDatabase(conn).load(portal)
            kept = {
                name: key_store.shared_secret(name, partial(bytes, value)) == value
                for name, value in secrets.items()
            }
        return Migrated(copied, users, len(portal[1]), kept)

    try:
        return call_briefly(url, copy, "dockmirror-admin")
    except (DatabaseUnavailable, psycopg.Error) as e:
        raise KeyStoreError(f"{Database(url, None)!r}: {str(e).strip()}") from None
