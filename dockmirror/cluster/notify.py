"""Notifications between every process of every node, over PostgreSQL's LISTEN/NOTIFY.

:class:`PostgresNotifier` is the cluster's :class:`~dockmirror._interfaces.INotifier`:
what one process publishes (a purge, a failed login) reaches every other
process of every node sharing the database.  Each process keeps one
dedicated connection that listens, in a thread of its own; it is made
again after PostgreSQL restarts, and then the process's *resync* listeners
are called, since notifications sent meanwhile are lost (the key store
reloads its revoked keys then).

A notification is the JSON list ``[origin, topic, [strings...], sent]`` on
the channel :data:`CHANNEL`, after the hex HMAC-SHA256 of that list under
the cluster's notification key.  PostgreSQL lets any role that may connect
to the database send and hear notifications, with no privilege on its
tables; the key is derived from the token signing key, which only roles
that may read ``cluster_secrets`` know, so a notification from anyone else
is ignored.  Each is checked on receipt as any input is: bounded in size,
signed, sent within :data:`MAX_AGE` seconds (a replay is short-lived), of
that exact shape, and only for topics someone subscribed to.  A process
ignores its own (same *origin*).  :func:`notify` sends one from inside a
transaction, so that it goes out when the change it announces commits.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from dockmirror._interfaces import INotifier
from dockmirror.cluster.database import Database, DatabaseUnavailable

log = Logger()

#: The channel every dockmirror process of the database listens on.
CHANNEL = "dockmirror"
#: Longest notification sent or accepted, in bytes (PostgreSQL's limit is 8000).
MAX_PAYLOAD = 4000
#: Strings one message may hold.
MAX_STRINGS = 64
#: Longest topic name.
MAX_TOPIC = 40
#: Seconds a notification is believed after it was sent (the nodes' clocks agree closely).
MAX_AGE = 120.0
#: Hex digits of a notification's HMAC.
MAC_LENGTH = 64
#: Seconds between log events about ignored notifications.
IGNORED_LOG_INTERVAL = 60.0
#: Seconds between attempts to listen again while PostgreSQL is away ...
RETRY_DELAY = 1.0
#: ... and how often the listening thread checks it should stop.
POLL_INTERVAL = 1.0


def notification_key(signing_key: bytes) -> bytes:
    """The key that signs notifications, derived from the token signing key's PEM."""
    return hmac.new(signing_key, b"dockmirror notifications", hashlib.sha256).digest()


def _mac(key: bytes, body: str) -> str:
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def encode(
    topic: str, message: list[str], key: bytes, origin: str = "", sent: float | None = None
) -> str | None:
    """The signed payload announcing *message* under *topic*; None if it is too long to send."""
    sent = time.time() if sent is None else sent
    body = json.dumps([origin, topic, message, sent], separators=(",", ":"))
    payload = _mac(key, body) + body
    if len(payload.encode()) > MAX_PAYLOAD or len(message) > MAX_STRINGS:
        return None
    return payload


def decode(payload: str, key: bytes, now: float) -> tuple[str, str, list[str]] | None:
    """``(origin, topic, message)`` of a well-formed payload signed with *key*, else None."""
    if len(payload) > MAX_PAYLOAD:
        return None
    mac, body = payload[:MAC_LENGTH], payload[MAC_LENGTH:]
    if not hmac.compare_digest(mac.encode(), _mac(key, body).encode()):
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not (isinstance(value, list) and len(value) == 4):
        return None
    origin, topic, message, sent = value
    if (
        isinstance(origin, str)
        and len(origin) <= MAX_TOPIC
        and isinstance(topic, str)
        and len(topic) <= MAX_TOPIC
        and isinstance(message, list)
        and len(message) <= MAX_STRINGS
        and all(isinstance(m, str) for m in message)
        and isinstance(sent, int | float)
        and abs(now - sent) <= MAX_AGE
    ):
        return origin, topic, message
    return None


def notify(conn: psycopg.Connection[Any], topic: str, message: list[str], key: bytes) -> None:
    """Send *message* on *conn*: at once, or when its transaction commits."""
    payload = encode(topic, message, key)
    if payload is None:
        raise ValueError(f"a {topic} notification of {len(message)} strings is too long")
    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


@implementer(INotifier)
class PostgresNotifier(service.Service):
    """Publishes through the node's pool; listens on a connection of its own."""

    def __init__(self, database: Database, reactor: Any, key: bytes) -> None:
        self._database = database
        self._reactor = reactor
        self._key = key
        self.origin = secrets.token_hex(8)
        self._listeners: dict[str, list[Callable[[list[str]], None]]] = {}
        self._resync: list[Callable[[], object]] = []
        self._stopping = threading.Event()
        self._thread = ThreadPool(minthreads=0, maxthreads=1, name="dockmirror-listen")
        self._done: Deferred[None] | None = None
        #: Why publishing fails, while it does (logged once).
        self._publish_error: str | None = None
        #: Whether the listening connection is up, and why not when it is not.
        self.listening = False
        self.listen_error: str | None = None
        #: Notifications ignored, and when that was last logged.
        self.ignored = 0
        self._warned: float | None = None

    def __repr__(self) -> str:
        state = "listening" if self.listening else "not listening"
        return f"<PostgresNotifier {self.origin} on {CHANNEL!r}: {state}>"

    def subscribe(self, topic: str, listener: Callable[[list[str]], None]) -> None:
        self._listeners.setdefault(topic, []).append(listener)

    def on_resync(self, listener: Callable[[], object]) -> None:
        """Call *listener* each time listening starts again after an interruption."""
        self._resync.append(listener)

    def publish(self, topic: str, message: list[str]) -> None:
        payload = encode(topic, message, self._key, self.origin, self._reactor.seconds())
        if payload is None:
            log.warn("not sending a {topic} notification: too long", topic=topic)
            return
        sent = Deferred.fromCoroutine(self._send(payload))
        sent.addErrback(lambda f: log.failure("sending a notification failed", f))

    async def _send(self, payload: str) -> None:
        try:
            await self._database.run(
                lambda conn: conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
            )
        except (DatabaseUnavailable, psycopg.Error) as e:
            if self._publish_error is None:
                log.warn("cannot notify the other nodes: {error}", error=str(e))
            self._publish_error = str(e)
        else:
            self._publish_error = None

    def startService(self) -> None:
        super().startService()
        self._stopping.clear()
        self._thread.start()
        self._done = deferToThreadPool(self._reactor, self._thread, self._listen)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self._stopping.set()
        done, self._done = self._done, None
        if done is None:
            return None
        return done.addBoth(lambda _: self._thread.stop())

    def _listen(self) -> None:
        """The listening thread: listen, dispatch, and listen again after a failure."""
        interrupted = False
        while not self._stopping.is_set():
            try:
                with psycopg.connect(
                    self._database.url,
                    autocommit=True,
                    connect_timeout=5,
                    application_name="dockmirror-listen",
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._reactor.callFromThread(self._listening, interrupted)
                    while not self._stopping.is_set():
                        for note in conn.notifies(timeout=POLL_INTERVAL):
                            self._reactor.callFromThread(self.received, note.payload)
            except psycopg.Error as e:
                self._reactor.callFromThread(self._lost, str(e).strip())
                interrupted = True
                self._stopping.wait(RETRY_DELAY)

    def _listening(self, again: bool) -> None:
        self.listening, self.listen_error = True, None
        if again:
            log.info("listening to the other nodes again")
            for listener in self._resync:
                listener()

    def _lost(self, error: str) -> None:
        if self.listening or self.listen_error is None:
            log.warn("cannot hear from the other nodes: {error}", error=error)
        self.listening, self.listen_error = False, error

    def received(self, payload: str) -> None:
        """Pass a notification on to its topic's listeners, if it is well formed and signed."""
        now = self._reactor.seconds()
        decoded = decode(payload, self._key, now)
        if decoded is None:
            self.ignored += 1
            if self._warned is None or now - self._warned >= IGNORED_LOG_INTERVAL:
                self._warned = now
                log.warn(
                    "ignored a notification that is malformed, stale or not signed by a node"
                    " ({n} bytes; {count} ignored so far)",
                    n=len(payload),
                    count=self.ignored,
                )
            return
        origin, topic, message = decoded
        if origin == self.origin:
            return
        for listener in self._listeners.get(topic, []):
            listener(message)
