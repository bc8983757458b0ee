"""What the key store does, in SQL that SQLite and PostgreSQL both speak.

Only an HMAC-SHA256 of each apiKey, under a random per-key salt, is stored.
An apiKey carries 256 random bits, so a fast hash is as good as a slow one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from dockmirror.auth.keys import (
    API_KEY_PREFIX,
    APP_ID_ALPHABET,
    APP_ID_LENGTH,
    APP_ID_PREFIX,
    DAY,
    HOUR,
    MAX_CREDENTIAL_LENGTH,
    NAME_MAX,
    OPERATOR,
    DailyUsage,
    KeyInfo,
    KeyList,
    KeyStoreError,
    NewKey,
    QuotaExceeded,
    Usage,
    iso_time,
)

#: Days of per-key daily usage kept (the portal charts 30).
USAGE_DAYS = 31
#: Hours of request counts kept (the portal charts 24).
TRAFFIC_HOURS = 48
_SECRET_BYTES = 32
_SALT_BYTES = 16
_COLUMNS = (
    "app_id, name, created_at, revoked_at, last_used_at,"
    " use_count, bytes_served, repositories, replaced_by, owner"
)


def _hash(salt: bytes, api_key: str) -> bytes:
    return hmac.new(salt, api_key.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


def _check_name(name: str) -> str:
    if not name.strip() or len(name) > NAME_MAX or not name.isprintable():
        raise ValueError(f"a key name is 1 to {NAME_MAX} printable characters")
    return name


def _info(row: Sequence[Any]) -> KeyInfo:
    repositories = json.loads(row[7]) if row[7] is not None else None
    return KeyInfo(
        app_id=row[0],
        name=row[1],
        created_at=row[2],
        revoked_at=row[3],
        last_used_at=row[4],
        use_count=row[5],
        bytes_served=row[6],
        repositories=tuple(repositories) if repositories is not None else None,
        replaced_by=row[8],
        owner=row[9],
    )


#: One row of a key store as :meth:`KeyQueries.export` gives it, every column.
Row = tuple[Any, ...]
#: The table of keys, then the daily usage, then the hourly traffic.
KeyDump = tuple[list[Row], list[Row], list[Row]]
_ALL_KEY_COLUMNS = (
    "app_id, name, salt, secret_hash, repositories, created_at, revoked_at,"
    " replaced_by, last_used_at, use_count, bytes_served, owner"
)

#: Hashed against when an appId is unknown, so that it takes as long as a known one.
_UNKNOWN_SALT = secrets.token_bytes(_SALT_BYTES)
#: What a store that other servers share announces: [appId, ...] revoked.
REVOKED_TOPIC = "revoked"


class KeyQueries:
    """What the key store does, in SQL that SQLite and PostgreSQL both speak.

    A subclass gives the connection: how a statement runs (:meth:`_rows`,
    :meth:`_run_many`), what a write transaction is (:meth:`_transaction`,
    which serializes writers), and the few words the two dialects spell
    differently.  Statements use ``?`` placeholders.
    """

    #: The SQL function giving the larger of two values.
    _greatest = "max"

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """Run one statement; its rows."""
        raise NotImplementedError

    def _run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement once per row of arguments."""
        raise NotImplementedError

    def _transaction(self) -> AbstractContextManager[None]:
        """A write transaction: one writer at a time, whatever the process."""
        raise NotImplementedError

    def _announce_revoked(self, app_ids: Sequence[str]) -> None:
        """Tell the servers sharing this store, when it commits, that *app_ids* are revoked.

        Servers reload the revoked keys every
        :data:`~dockmirror.auth.keystore.FLUSH_INTERVAL` anyway; a store that
        can announce (PostgreSQL) makes it at once.
        """

    def _row(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        rows = self._rows(sql, args)
        return rows[0] if rows else None

    def _now(self) -> int:
        return int(self._clock())

    def _get(self, app_id: str) -> KeyInfo:
        row = self._row(f"SELECT {_COLUMNS} FROM keys WHERE app_id = ?", (app_id,))
        if row is None:
            raise KeyStoreError(f"no key {app_id}")
        return _info(row)

    def _insert(
        self, name: str, repositories: Sequence[str] | None, owner: str = OPERATOR
    ) -> NewKey:
        app_id = APP_ID_PREFIX + "".join(
            secrets.choice(APP_ID_ALPHABET) for _ in range(APP_ID_LENGTH)
        )
        api_key = API_KEY_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
        salt = secrets.token_bytes(_SALT_BYTES)
        self._rows(
            "INSERT INTO keys (app_id, name, salt, secret_hash, repositories, created_at, owner)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                app_id,
                name,
                salt,
                _hash(salt, api_key),
                json.dumps(list(repositories)) if repositories is not None else None,
                self._now(),
                owner,
            ),
        )
        return NewKey(app_id, api_key, name)

    def create(
        self,
        name: str,
        repositories: Sequence[str] | None = None,
        owner: str = OPERATOR,
        max_live: int | None = None,
    ) -> NewKey:
        """Make a key; *repositories* limits it to those ``UPSTREAM/PREFIX`` rules.

        With *max_live*, refuses (:class:`QuotaExceeded`) when *owner* already
        has that many keys not revoked.
        """
        _check_name(name)
        with self._transaction():
            if max_live is not None:
                (live,) = self._rows(
                    "SELECT count(*) FROM keys WHERE owner = ? AND revoked_at IS NULL", (owner,)
                )[0]
                if live >= max_live:
                    raise QuotaExceeded(f"{owner} already has {live} keys (at most {max_live})")
            return self._insert(name, repositories, owner)

    def get(self, app_id: str) -> KeyInfo:
        return self._get(app_id)

    def list(self, owner: str | None = None) -> KeyList:
        """Every key, or only *owner*'s."""
        where, args = ("WHERE owner = ?", (owner,)) if owner is not None else ("", ())
        rows = self._rows(f"SELECT {_COLUMNS} FROM keys {where} ORDER BY created_at, app_id", args)
        return KeyList(_info(row) for row in rows)

    def revoke_owner(self, owner: str) -> tuple[str, ...]:
        """Revoke every live key of *owner*; the appIds revoked."""
        with self._transaction():
            rows = self._rows(
                "SELECT app_id FROM keys WHERE owner = ? AND revoked_at IS NULL", (owner,)
            )
            self._rows(
                "UPDATE keys SET revoked_at = ? WHERE owner = ? AND revoked_at IS NULL",
                (self._now(), owner),
            )
            revoked = tuple(app_id for (app_id,) in rows)
            self._announce_revoked(revoked)
        return revoked

    def revoke(self, app_id: str) -> KeyInfo:
        """Revoke a key; revoking a revoked key changes nothing."""
        with self._transaction():
            self._get(app_id)
            self._rows(
                "UPDATE keys SET revoked_at = ? WHERE app_id = ? AND revoked_at IS NULL",
                (self._now(), app_id),
            )
            self._announce_revoked([app_id])
            return self._get(app_id)

    def rotate(self, app_id: str) -> NewKey:
        """Replace a key by a new one with the same name and limits; revoke the old one."""
        with self._transaction():
            old = self._get(app_id)
            if old.revoked:
                raise KeyStoreError(f"key {app_id} is revoked; create a new key instead")
            new = self._insert(old.name, old.repositories, old.owner)
            self._rows(
                "UPDATE keys SET revoked_at = ?, replaced_by = ? WHERE app_id = ?",
                (self._now(), new.app_id, app_id),
            )
            self._announce_revoked([app_id])
            return new

    def verify(self, app_id: str, api_key: str) -> KeyInfo | None:
        """The key if *api_key* is its secret and it is not revoked, else None.

        The secret is compared in constant time, and an unknown appId costs
        the same hashing as a known one.
        """
        row = None
        if len(app_id) <= MAX_CREDENTIAL_LENGTH and len(api_key) <= MAX_CREDENTIAL_LENGTH:
            row = self._row(
                f"SELECT salt, secret_hash, {_COLUMNS} FROM keys WHERE app_id = ?", (app_id,)
            )
        salt, expected = (bytes(row[0]), bytes(row[1])) if row else (_UNKNOWN_SALT, b"")
        matches = hmac.compare_digest(_hash(salt, api_key[:MAX_CREDENTIAL_LENGTH]), expected)
        if row is None or not matches:
            return None
        info = _info(row[2:])
        return None if info.revoked else info

    def add_usage(self, usage: Mapping[str, Usage]) -> None:
        """Add batched usage counters, totals and per day, in one transaction."""
        with self._transaction():
            self._run_many(
                "UPDATE keys SET use_count = use_count + ?, bytes_served = bytes_served + ?,"
                f" last_used_at = {self._greatest}(coalesce(last_used_at, 0), ?)"
                " WHERE app_id = ?",
                [(u.requests, u.bytes, u.last_used, app_id) for app_id, u in usage.items()],
            )
            self._run_many(
                "INSERT INTO key_usage_daily (app_id, day, requests, bytes)"
                " SELECT app_id, ?, ?, ? FROM keys WHERE app_id = ?"
                " ON CONFLICT (app_id, day) DO UPDATE SET"
                " requests = key_usage_daily.requests + excluded.requests,"
                " bytes = key_usage_daily.bytes + excluded.bytes",
                [(u.last_used // DAY, u.requests, u.bytes, app_id) for app_id, u in usage.items()],
            )
            self._rows(
                "DELETE FROM key_usage_daily WHERE day <= ?", (self._now() // DAY - USAGE_DAYS,)
            )

    def daily_usage(self, owner: str | None, days: int) -> tuple[DailyUsage, ...]:
        """``(appId, day, requests, bytes)`` of the last *days* UTC days, today included.

        Only *owner*'s keys, or everyone's if None.
        """
        since = self._now() // DAY - days + 1
        query = (
            "SELECT u.app_id, u.day, u.requests, u.bytes FROM key_usage_daily u"
            " JOIN keys k ON k.app_id = u.app_id WHERE u.day >= ?"
        )
        args: tuple[Any, ...] = (since,)
        if owner is not None:
            query += " AND k.owner = ?"
            args += (owner,)
        rows = self._rows(query + " ORDER BY u.day, u.app_id", args)
        return tuple((a, d, r, b) for a, d, r, b in rows)

    def add_traffic(self, hour: int, requests: int) -> None:
        """Count *requests* answered in *hour* (hours since the epoch)."""
        with self._transaction():
            self._rows(
                "INSERT INTO traffic_hourly (hour, requests) VALUES (?, ?) ON CONFLICT (hour)"
                " DO UPDATE SET requests = traffic_hourly.requests + excluded.requests",
                (hour, requests),
            )
            self._rows("DELETE FROM traffic_hourly WHERE hour <= ?", (hour - TRAFFIC_HOURS,))

    def traffic(self, hours: int) -> dict[int, int]:
        """Requests per hour of the last *hours* hours, this one included."""
        since = self._now() // HOUR - hours + 1
        rows = self._rows("SELECT hour, requests FROM traffic_hourly WHERE hour >= ?", (since,))
        return {hour: requests for hour, requests in rows}

    def revoked_ids(self) -> frozenset[str]:
        rows = self._rows("SELECT app_id FROM keys WHERE revoked_at IS NOT NULL")
        return frozenset(app_id for (app_id,) in rows)

    def stats(self) -> dict[str, Any]:
        keys, revoked, requests, sent, last = self._rows(
            "SELECT count(*), count(revoked_at), coalesce(sum(use_count), 0),"
            " coalesce(sum(bytes_served), 0), max(last_used_at) FROM keys"
        )[0]
        return {
            "keys": keys,
            "active": keys - revoked,
            "revoked": revoked,
            # PostgreSQL sums integers as numeric.
            "requests": int(requests),
            "bytesServed": int(sent),
            "lastUsedAt": iso_time(last) if last is not None else None,
        }

    def export(self) -> KeyDump:
        """Every key (hashes and salts as stored), its daily usage and the hourly traffic."""
        return (
            self._rows(f"SELECT {_ALL_KEY_COLUMNS} FROM keys ORDER BY created_at, app_id"),
            self._rows("SELECT app_id, day, requests, bytes FROM key_usage_daily"),
            self._rows("SELECT hour, requests FROM traffic_hourly"),
        )

    def load(self, dump: KeyDump) -> tuple[int, int]:
        """Copy the keys of *dump* (of :meth:`export`) that this store does not hold.

        A key held already stays as it is, usage included, so that copying
        again changes nothing.  Every key copied keeps its appId and secret
        hash, so its apiKey keeps working; traffic is copied for the hours
        this store has none.  Returns how many keys were copied and skipped.
        """
        keys, daily, traffic = dump
        with self._transaction():
            held = {app_id for (app_id,) in self._rows("SELECT app_id FROM keys")}
            new = [row for row in keys if row[0] not in held]
            copied = {row[0] for row in new}
            # A rotated key names its successor, made later: names are set once all exist.
            self._run_many(
                f"INSERT INTO keys ({_ALL_KEY_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?)",
                [(*row[:7], *row[8:]) for row in new],
            )
            self._run_many(
                "UPDATE keys SET replaced_by = ? WHERE app_id = ?",
                [(row[7], row[0]) for row in new if row[7] is not None],
            )
            self._run_many(
                "INSERT INTO key_usage_daily (app_id, day, requests, bytes) VALUES (?, ?, ?, ?)",
                [row for row in daily if row[0] in copied],
            )
            self._run_many(
                "INSERT INTO traffic_hourly (hour, requests) VALUES (?, ?)"
                " ON CONFLICT (hour) DO NOTHING",
                traffic,
            )
        return len(new), len(keys) - len(new)
