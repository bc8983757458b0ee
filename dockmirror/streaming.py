"""Streaming an upstream response body to a consumer, with flow control both ways.

The upstream socket is registered as the consumer's push producer, so a slow
client pauses the upstream read, and the consumer (the client's request) sees
each chunk as it lands.  An idle timer, stopped while the client holds the
stream paused, guards against an upstream that stops sending.
"""

from __future__ import annotations

import hashlib
import typing
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse
from zope.interface import implementer

log = Logger()

#: Seconds without a byte from an upstream that is not paused before giving up.
IDLE_TIMEOUT = 60.0


class StreamError(Exception):
    """The body could not be delivered whole and correct."""


class DigestMismatch(StreamError):
    pass


class IdleTimer:
    """Calls *expired* once *timeout* seconds pass without a :meth:`touch`.

    It runs only between :meth:`start` and :meth:`stop`, so a stream can stop
    it while it is paused on purpose.
    """

    def __init__(
        self, reactor: IReactorTime, timeout: float, expired: typing.Callable[[], None]
    ) -> None:
        self.timeout = timeout
        self._reactor = reactor
        self._expired = expired
        self._call: IDelayedCall | None = None

    def start(self) -> None:
        if self._call is None:
            self._call = self._reactor.callLater(self.timeout, self._expire)

    def touch(self) -> None:
        if self._call is not None:
            self._call.reset(self.timeout)

    def stop(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _expire(self) -> None:
        self._call = None
        self._expired()


class Stream(typing.Protocol):
    """A body that writes itself to a consumer; fires with the bytes written."""

    def write_to(self, consumer: IConsumer) -> Deferred[int]: ...


def release(consumer: IConsumer) -> None:
    """Unregister the producer of *consumer*, unless its connection is gone.

    A request whose client went away has no channel left to unregister from.
    """
    if getattr(consumer, "channel", True) is not None:
        consumer.unregisterProducer()


@implementer(IPushProducer)
class BodyStream(Protocol):
    """Copies one upstream body into a consumer.

    With *digest*, the body is hashed on the way and its last chunk is held
    back until the hash matches, so a consumer never receives a complete,
    wrong body.  :attr:`done` fires with the byte count, or fails with
    :class:`StreamError`; cancelling it aborts the upstream connection.
    """

    def __init__(
        self,
        response: IResponse,
        reactor: IReactorTime,
        *,
        length: int | None = None,
        digest: str | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        count: Callable[[int], object] | None = None,
    ) -> None:
        self._response = response
        self._count = count
        self._reactor = reactor
        self._length = length
        self._digest = digest
        self._hash = hashlib.new(digest.partition(":")[0]) if digest else None
        self._consumer: IConsumer | None = None
        self._timer = IdleTimer(reactor, idle_timeout, self._idle)
        self._held = b""
        self._paused = False
        self.received = 0
        self.done: Deferred[int] = Deferred(self._cancel)

    def write_to(self, consumer: IConsumer) -> Deferred[int]:
        self._consumer = consumer
        consumer.registerProducer(self, True)
        self._response.deliverBody(self)
        return self.done

    @property
    def _upstream(self) -> IPushProducer | None:
        """The upstream response's transport, which pauses the socket."""
        return cast(IPushProducer | None, self.transport)

    # IPushProducer, as seen by the consumer
    def pauseProducing(self) -> None:
        self._paused = True
        self._timer.stop()
        if self._upstream is not None:
            self._upstream.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._start_timer()
        if self._upstream is not None:
            self._upstream.resumeProducing()

    def stopProducing(self) -> None:
        self._abort()

    # Protocol, as seen by the upstream response
    def connectionMade(self) -> None:
        if self._paused and self._upstream is not None:
            self._upstream.pauseProducing()
        else:
            self._start_timer()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.received += len(data)
        if self._count is not None:
            self._count(len(data))
        if self._length is not None and self.received > self._length:
            self._fail(StreamError(f"upstream sent more than {self._length} bytes"))
            return
        self._timer.touch()
        if self._hash is not None:
            self._hash.update(data)
            data, self._held = self._held, data
        if data:
            assert self._consumer is not None
            self._consumer.write(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self._timer.stop()
        if self.done.called:
            return
        if not reason.check(ResponseDone):
            self._fail(StreamError(f"upstream body failed: {reason.getErrorMessage()}"))
        elif self._length is not None and self.received != self._length:
            self._fail(StreamError(f"upstream sent {self.received} of {self._length} bytes"))
        elif self._hash is not None and f"{self._hash.name}:{self._hash.hexdigest()}" != (
            self._digest
        ):
            self._fail(DigestMismatch(f"upstream bytes do not match {self._digest}"))
        else:
            if self._held:
                assert self._consumer is not None
                self._consumer.write(self._held)
            self._finish()
            self.done.callback(self.received)

    def _finish(self) -> None:
        if self._consumer is not None:
            release(self._consumer)
            self._consumer = None

    def _fail(self, error: StreamError) -> None:
        self._abort()
        self._finish()
        if not self.done.called:
            self.done.errback(error)

    def _abort(self) -> None:
        self._timer.stop()
        if self._upstream is not None:
            self._upstream.stopProducing()

    def _cancel(self, d: Deferred[Any]) -> None:
        self._abort()
        self._finish()

    def _start_timer(self) -> None:
        if not self.done.called:
            self._timer.start()

    def _idle(self) -> None:
        self._fail(StreamError(f"upstream sent nothing for {self._timer.timeout:.0f}s"))
