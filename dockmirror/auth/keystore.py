"""The server's key store: queries in threads, usage counters written in batches.

:class:`KeyStore` is the service; a :class:`KeyBackend` keeps the keys: an
SQLite file (:class:`~dockmirror.auth.keydb.SQLiteKeys`), or the cluster's
PostgreSQL database.  What the store does is in
:class:`~dockmirror.auth.queries.KeyQueries`, the keys it gives in
:mod:`dockmirror.auth.keys`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dockmirror._interfaces import INotifier
from dockmirror.auth.keydb import SQLiteKeys
from dockmirror.auth.keys import (
    APP_ID_RE,
    OPERATOR,
    DailyUsage,
    KeyInfo,
    KeyList,
    KeyStoreError,
    NewKey,
    Usage,
)
from dockmirror.auth.queries import REVOKED_TOPIC, KeyQueries

log = Logger()

T = TypeVar("T")
#: Seconds between writes of the usage counters.
FLUSH_INTERVAL = 5.0


class KeyBackend(Protocol):
    """Where a :class:`KeyStore` keeps its keys, and how it reaches them off the reactor."""

    #: What messages call it: a file, or a database.
    name: str
    #: Whether other nodes share it: its outage then hits every node alike.
    shared: bool
    #: Whether it can only verify keys, not write.
    read_only: bool

    def start(self) -> None:
        """Start the threads queries run in."""

    def stop(self) -> None:
        """Stop them."""

    def open(self) -> frozenset[str] | str:
        """Make the store ready (blocking): its revoked appIds, or why it is not ready."""

    async def in_thread(self, f: Callable[[], T]) -> T:
        """``f()`` in one of the store's threads."""

    async def run(self, f: Callable[[KeyQueries], T]) -> T:
        """``f(queries)`` in one of the store's threads; its errors as :class:`KeyStoreError`."""

    def close(self) -> None:
        """Close the store (blocking)."""


class KeyStore(service.Service):
    """The server's key store: queries in threads, batched usage counters.

    The store is opened when the service starts, not before: twistd forks
    to daemonize after making its services, and an SQLite connection must not
    cross a fork (its POSIX locks stay behind in the parent).

    ``revoked`` is the set of revoked appIds, refreshed at each flush, so that
    bearer tokens of a key revoked by ``dockmirror-admin`` stop working within
    :data:`FLUSH_INTERVAL` seconds rather than when they expire.  A store
    shared by several nodes also announces revocations (:meth:`share`),
    which then take effect at once.
    """

    def __init__(
        self, store: str | Path | KeyBackend, reactor: Any, flush_interval: float = FLUSH_INTERVAL
    ) -> None:
        """*store*: an SQLite file, or another :class:`KeyBackend`."""
        self.backend = SQLiteKeys(store, reactor) if isinstance(store, str | Path) else store
        self._reactor = reactor
        self._interval = flush_interval
        self._pending: dict[str, Usage] = {}
        self._loop = LoopingCall(self.flush)
        #: One flush at a time: the loop's, a resync's and the last one at stop.
        self._flushing = DeferredLock()
        self._loop.clock = reactor
        self._open = False
        #: Revocations heard while the revoked set is being reloaded.
        self._heard: set[str] | None = None
        self.revoked: frozenset[str] = frozenset()
        #: Why the database cannot be opened, while it cannot.
        self.unavailable: str | None = None
        #: Why the last usage counters could not be written, until a write succeeds.
        self.write_error: str | None = None

    def share(self, notifier: INotifier) -> None:
        """Hear of keys revoked elsewhere through *notifier*."""
        notifier.subscribe(REVOKED_TOPIC, self._revoked_elsewhere)

    def _revoked_elsewhere(self, app_ids: list[str]) -> None:
        heard = {a for a in app_ids if APP_ID_RE.fullmatch(a)}
        self.revoked |= heard
        if self._heard is not None:
            self._heard |= heard

    def startService(self) -> None:
        # Opening is quick (a file, a few pragmas), and done before serving.
        # A key store that cannot be opened does not stop the mirror (a
        # restart would not mend it): it is tried again at every flush, and
        # meanwhile logins get 503 and /healthz says why.
        self._opened(self.backend.open())
        super().startService()
        self.backend.start()
        self._loop.start(self._interval, now=False)

    def _opened(self, result: frozenset[str] | str) -> None:
        if isinstance(result, str):
            if result != self.unavailable:
                log.error("the key store is unavailable: {error}", error=result)
            self.unavailable = result
            return
        if self.unavailable is not None:
            log.info("the key store {name} is open again", name=self.backend.name)
        self._open, self.unavailable = True, None
        self.revoked |= result
        if self.backend.read_only:
            self.write_error = f"{self.backend.name} is on a read-only file system"
            log.error("the key store {error}: key usage is kept in memory", error=self.write_error)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        await self.flush()
        if self._open:
            await self.backend.in_thread(self.backend.close)
        self.backend.stop()

    async def _query(self, f: Callable[[KeyQueries], T]) -> T:
        """Run ``f(queries)`` in the store's thread; KeyStoreError if it is unavailable."""
        if not self._open:
            raise KeyStoreError(f"the key store is unavailable: {self.unavailable}")
        return await self.backend.run(f)

    def record(self, app_id: str, nbytes: int) -> None:
        """Count one request by *app_id* that sent *nbytes*; written at the next flush."""
        now = int(self._reactor.seconds())
        self._pending.setdefault(app_id, Usage()).add(1, nbytes, now)

    def flush(self) -> Deferred[None]:
        """Write the pending usage counters and reload the revoked set.

        A flush asked for while another runs waits for it, then runs.
        """
        return self._flushing.run(lambda: Deferred.fromCoroutine(self._flush()))

    async def _flush(self) -> None:
        """Never fails: an error is logged and the usage kept for the next flush,
        so that the loop (and with it revocations reaching tokens) goes on."""
        if not self._open:
            self._opened(await self.backend.in_thread(self.backend.open))
        if not self._open:
            return  # the usage waits in memory for the database to open
        pending, self._pending = self._pending, {}
        try:
            if pending:
                await self._query(lambda db: db.add_usage(pending))
                pending = {}
                self.write_error = None
            self._heard = set()
            revoked = await self._query(lambda db: db.revoked_ids())
            self.revoked = revoked | self._heard
        except KeyStoreError as e:
            if str(e) != self.write_error:
                log.error("cannot write key usage: {error}", error=str(e))
            self.write_error = str(e)
        except Exception:  # noqa: BLE001 - logged; the loop must go on
            log.failure("unexpected error writing key usage")
        finally:
            self._heard = None
        for app_id, usage in pending.items():
            self._pending.setdefault(app_id, Usage()).add(
                usage.requests, usage.bytes, usage.last_used
            )

    async def check(self) -> bool | str:
        """For ``/healthz``: True while the database answers a query."""
        if not self._open:
            return f"the key store is unavailable: {self.unavailable or 'not open'}"
        try:
            await self._query(lambda db: db.revoked_ids())
        except KeyStoreError as e:
            return str(e)
        return True

    async def verify(self, app_id: str, api_key: str) -> KeyInfo | None:
        return await self._query(lambda db: db.verify(app_id, api_key))

    async def create(
        self,
        name: str,
        repositories: Sequence[str] | None = None,
        owner: str = OPERATOR,
        max_live: int | None = None,
    ) -> NewKey:
        return await self._query(lambda db: db.create(name, repositories, owner, max_live))

    async def get(self, app_id: str) -> KeyInfo:
        return await self._query(lambda db: db.get(app_id))

    async def list(self, owner: str | None = None) -> KeyList:
        return await self._query(lambda db: db.list(owner))

    async def revoke_owner(self, owner: str) -> tuple[str, ...]:
        """Revoke every key of *owner*; their tokens stop working at once here."""
        revoked = await self._query(lambda db: db.revoke_owner(owner))
        self.revoked |= set(revoked)
        return revoked

    async def daily_usage(self, owner: str | None, days: int) -> tuple[DailyUsage, ...]:
        return await self._query(lambda db: db.daily_usage(owner, days))

    async def add_traffic(self, hour: int, requests: int) -> None:
        await self._query(lambda db: db.add_traffic(hour, requests))

    async def traffic(self, hours: int) -> dict[int, int]:
        return await self._query(lambda db: db.traffic(hours))

    async def revoke(self, app_id: str) -> KeyInfo:
        info = await self._query(lambda db: db.revoke(app_id))
        self.revoked |= {app_id}
        return info

    async def rotate(self, app_id: str) -> NewKey:
        new = await self._query(lambda db: db.rotate(app_id))
        self.revoked |= {app_id}
        return new

    async def stats(self) -> dict[str, Any]:
        stats = await self._query(lambda db: db.stats())
        stats["pendingUsage"] = sum(u.requests for u in self._pending.values())
        return stats
