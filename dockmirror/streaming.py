"""Streaming bodies to a consumer, with flow control both ways.

:class:`BodyStream` copies an upstream response body: the upstream socket is
registered as the consumer's push producer, so a slow client pauses the
upstream read, and the consumer (the client's request) sees each chunk as it
lands.  An idle timer, stopped while the client holds the stream paused,
guards against an upstream that stops sending.

:class:`FileSender` sends part of a file to a client straight from the
file to the socket: on plain TCP with ``os.sendfile``, so the bytes go from
the page cache to the socket without entering Python; over TLS in large
pieces read into one buffer, encrypted by the connection's :class:`Sealer`
and written with one system call, past Twisted's buffers and producers.
"""

from __future__ import annotations

import hashlib
import os
import re
import typing
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import abstract, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorFDSet,
    IReactorTime,
    IWriteDescriptor,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse
from zope.interface import implementer

log = Logger()

#: Seconds without a byte from an upstream that is not paused before giving up.
IDLE_TIMEOUT = 60.0
#: The most one client is sent by ``sendfile`` before other work gets a turn ...
SENDFILE_TURN = 8 << 20
#: ... and over TLS, where each byte costs more, read from the file this much at a time.
SEAL_TURN = 1 << 20
SEAL_CHUNK = 256 << 10
#: The most buffers one ``writev`` takes.
_IOV_MAX = 1024
#: Bytes read from an upstream's socket at a time for a blob's body (Twisted reads 64 KiB).
BODY_READ = 256 << 10


class StreamError(Exception):
    """The body could not be delivered whole and correct."""


class DigestMismatch(StreamError):
    pass


class ShortFile(StreamError):
    """A file ended before the bytes it was supposed to hold."""


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


def read_large(transport: object) -> None:
    """Have the socket under a response body's *transport* read :data:`BODY_READ` at a time.

    Each read costs the reactor thread a pass through the HTTP client's
    parser and the body's own bookkeeping, all in Python: a blob's body
    read in fewer, larger pieces costs less per byte.  *transport* is what
    Twisted's HTTP client gives a body protocol (a proxy of the
    connection's transport), with TLS or not; any other kind is left alone.
    """
    transport = getattr(transport, "_producer", transport)  # the client's TransportProxyProducer
    while isinstance(transport, ProtocolWrapper):  # TLS to the upstream
        transport = transport.transport
    if isinstance(transport, abstract.FileDescriptor):
        transport.bufferSize = BODY_READ


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


class Sealer(typing.Protocol):
    """A TLS connection whose records can go somewhere else than its transport.

    :class:`dockmirror.tls.WholeRecordsTLS` is one.
    """

    @property
    def sealing(self) -> bool:
        """Whether :meth:`seal` may be used now (handshake done, nothing held back)."""

    def divert(self, sink: Callable[[bytes], object] | None) -> None:
        """Hand every record for the peer to *sink* (None: to the transport again)."""

    def seal(self, data: memoryview) -> None:
        """Encrypt all of *data* at once, into the records handed to the sink."""


class Growing(typing.Protocol):
    """A file still being written, as a :class:`FileSender` follows it."""

    def extent(self) -> tuple[int, int]:
        """The bytes in the file now, and how far the sender may go (past the file: in memory)."""

    def queued(self, offset: int, limit: int) -> bytes:
        """Bytes [offset, limit) from memory, past the end of the file."""


def file_transport(consumer: IConsumer) -> tuple[tcp.Server, Sealer | None] | None:
    """The TCP connection under *consumer* (a request), if a file can be sent to it directly.

    That is when nothing but plain TCP is between, or one TLS layer that is a
    :class:`Sealer` ready to seal (given with it).  Protocol wrappers (as the
    plain listener's TLS detector) are looked through; any other TLS layer or
    kind of transport gives None.
    """
    channel = getattr(consumer, "channel", None)
    transport = getattr(channel, "transport", None)
    sealer: Sealer | None = None
    while isinstance(transport, ProtocolWrapper):
        if isinstance(transport, TLSMemoryBIOProtocol):
            if sealer is not None or not getattr(transport, "sealing", False):
                return None
            sealer = cast(Sealer, transport)
        transport = transport.transport
    if isinstance(transport, tcp.Server) and not transport.TLS and transport.connected:
        return transport, sealer
    return None


@implementer(IPushProducer, IWriteDescriptor)
class FileSender:
    """Bytes [start, end) of the file *fd*, sent straight to a TCP connection.

    The sender writes on its own duplicate of the connection's socket, which
    it registers with the reactor as a writer.  It starts once Twisted's
    buffer for the connection is empty, so the response's headers go first,
    and it sends only while the socket can take more: a client that stops
    reading stops the file reads.

    On plain TCP the bytes go with ``os.sendfile``.  With a *sealer* (the
    connection's TLS layer), they are read :data:`SEAL_CHUNK` at a time into
    one buffer, sealed into records, and written with ``writev``; while the
    sender runs, every record of the connection comes through it, so none
    overtakes another.  :attr:`done` fires with the byte count, or fails with
    :class:`StreamError` (:class:`ShortFile` when the file ends early);
    cancelling it stops the sending.  *fd* stays open: it belongs to the
    caller.

    Over TLS, a *growing* file is sent as far as its :meth:`Growing.extent` allows,
    the bytes past the file's end from memory once there are
    :data:`SEAL_CHUNK` of them (or all the rest); its owner calls
    :meth:`grown` when the extent moves.  In between, the sender is no
    writer of the reactor.
    """

    def __init__(
        self,
        reactor: IReactorFDSet,
        transport: tcp.Server,
        fd: int,
        start: int,
        end: int,
        count: Callable[[int], object],
        sealer: Sealer | None = None,
        growing: Growing | None = None,
    ) -> None:
        self._reactor = reactor
        self._transport: tcp.Server | None = transport
        self._fd = fd
        self._start = self._pos = start
        self._end = end
        self._count = count
        self._sealer = sealer
        assert growing is None or sealer is not None, "a growing file is sent over TLS only"
        self._growing = growing
        #: Records sealed and not written yet, oldest first.
        self._records: list[memoryview] = []
        self._buffer = bytearray(SEAL_CHUNK if sealer is not None else 0)
        self._socket: int | None = None
        self._consumer: IConsumer | None = None
        self._writing = False
        self._paused = False
        self.done: Deferred[int] = Deferred(lambda _: self._close())

    def __repr__(self) -> str:
        return f"<FileSender fd {self._fd} at {self._pos} of {self._start}-{self._end}>"

    def write_to(self, consumer: IConsumer) -> Deferred[int]:
        """Send the headers through *consumer*, then the file around it."""
        assert self._transport is not None
        self._consumer = consumer
        consumer.registerProducer(self, True)
        consumer.write(b"")  # the status line and headers, into Twisted's buffer
        if self._sealer is not None:
            self._sealer.divert(self._sealed)
        try:
            self._socket = os.dup(self._transport.fileno())
        except OSError as e:
            self._fail(StreamError(f"cannot send the file: {e.strerror}"))
            return self.done
        self._set_writing()
        return self.done

    # IWriteDescriptor, as seen by the reactor
    def fileno(self) -> int:
        return self._socket if self._socket is not None else -1

    def logPrefix(self) -> str:
        return "FileSender"

    def doWrite(self) -> None:
        if self._transport is not None:
            if self._transport in self._reactor.getWriters():
                return  # Twisted has yet to send the headers.
            self._transport = None  # it has nothing more to send
        try:
            if self._sealer is None:
                self._sendfile()
            else:
                self._send_sealed(self._sealer)
        except BlockingIOError:
            return  # the socket is full; wait until it is writable again
        except StreamError as e:
            self._fail(e)
            return
        except OSError as e:
            self._fail(StreamError(f"sending to the client failed: {e.strerror}"))
            return
        if self._pos >= self._end and not self._records:
            self._close()
            self.done.callback(self._pos - self._start)
        else:
            self._set_writing()

    def grown(self) -> None:
        """The growing file's extent moved: send what it allows now."""
        self._set_writing()

    def _extent(self) -> tuple[int, int]:
        """How far the file goes, and how far the sender may go now."""
        if self._growing is None:
            return self._end, self._end
        in_file, limit = self._growing.extent()
        if limit - max(self._pos, in_file) < SEAL_CHUNK and limit < self._end - 1:
            limit = in_file  # wait for a whole chunk in memory, or the end
        return min(in_file, limit), limit

    def _memory(self, limit: int) -> bytes:
        """The next bytes from memory, below *limit*."""
        assert self._growing is not None
        return self._growing.queued(self._pos, min(limit, self._pos + SEAL_CHUNK))

    def _sendfile(self) -> None:
        assert self._socket is not None
        turn = SENDFILE_TURN
        while self._pos < self._end and turn > 0:
            wanted = min(self._end - self._pos, turn)
            sent = os.sendfile(self._socket, self._fd, self._pos, wanted)
            if sent == 0:
                raise ShortFile(f"the file ended at {self._pos}, before {self._end}")
            self._sent(sent)
            turn -= sent
            if sent < wanted:
                raise BlockingIOError  # the socket is full

    def _send_sealed(self, sealer: Sealer) -> None:
        turn = SEAL_TURN
        view = memoryview(self._buffer)
        while True:
            self._write_records()
            in_file, limit = self._extent()
            if self._pos >= limit or turn <= 0:
                return
            if self._pos < in_file:
                wanted = min(in_file - self._pos, SEAL_CHUNK)
                count = os.preadv(self._fd, [view[:wanted]], self._pos)
                if count == 0:
                    raise ShortFile(f"the file ended at {self._pos}, before {in_file}")
                piece = view[:count]
            else:
                piece = memoryview(self._memory(limit))
                count = len(piece)
            try:
                sealer.seal(piece)
            except Exception as e:  # an SSL error, or a renegotiation
                raise StreamError(f"TLS failed: {e}") from e
            self._sent(count)
            turn -= count

    def _sealed(self, records: bytes) -> None:
        self._records.append(memoryview(records))
        self._set_writing()  # a record made between sends (an alert) goes out too

    def _write_records(self) -> None:
        """Write the records sealed so far; BlockingIOError if the socket takes no more."""
        assert self._socket is not None
        while self._records:
            written = os.writev(self._socket, self._records[:_IOV_MAX])
            while written and written >= len(self._records[0]):
                written -= len(self._records.pop(0))
            if written:
                self._records[0] = self._records[0][written:]
                raise BlockingIOError  # partly written: the socket is full

    def _sent(self, count: int) -> None:
        self._pos += count
        self._count(count)
        if self._consumer is not None and hasattr(self._consumer, "sentLength"):
            self._consumer.sentLength += count  # for the access log

    def connectionLost(self, reason: Failure) -> None:
        self._fail(StreamError(f"the client connection failed: {reason.getErrorMessage()}"))

    # IPushProducer, as seen by the consumer
    def pauseProducing(self) -> None:
        self._paused = True
        self._set_writing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._set_writing()

    def stopProducing(self) -> None:
        self._consumer = None  # the connection is gone
        self._fail(StreamError("the client went away"))

    def _set_writing(self) -> None:
        """Be a writer of the reactor exactly while there is something to send."""
        wanted = (
            self._socket is not None
            and not self._paused
            and not self.done.called
            and (bool(self._records) or self._pos < self._extent()[1])
        )
        if wanted and not self._writing:
            self._reactor.addWriter(self)
        elif self._writing and not wanted:
            self._reactor.removeWriter(self)
        self._writing = wanted

    def _fail(self, error: StreamError) -> None:
        if not self.done.called:
            self._close()
            self.done.errback(error)

    def _close(self) -> None:
        if self._writing:
            self._reactor.removeWriter(self)
            self._writing = False
        if self._socket is not None:
            os.close(self._socket)
            self._socket = None
        if self._sealer is not None:
            self._sealer.divert(None)
            self._sealer = None
        self._records.clear()
        if self._consumer is not None:
            release(self._consumer)
            self._consumer = None


def content_range_start(response: IResponse, size: int) -> int | None:
    """Where a 206 answer's body starts in a blob of *size* bytes; None if it is not the rest."""
    values = response.headers.getRawHeaders(b"content-range") or []
    match = re.fullmatch(rb"bytes (\d{1,19})-(\d{1,19})/(\d{1,19})", values[0]) if values else None
    if match is None or int(match[2]) != size - 1 or int(match[3]) != size:
        return None
    return int(match[1])
