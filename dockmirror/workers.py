"""Worker processes: the supervisor that binds and spawns, and the worker's side.

With ``[server] workers = N`` above 1, ``twistd dockmirror`` runs a
:class:`Supervisor`.  It binds every listener once (so a privileged port
needs the capability only at start, and all workers share one accept queue
per listener) and spawns N copies of itself in worker mode, each handed the
listening sockets as file descriptors 4, 5, ... in the order of
:func:`inherited`.  Every worker polls the same sockets; at each new
connection, a worker that has more connections open than another leaves it
to the others for a moment (:class:`BalancedPort`, counting in a small
file they all map, :class:`WorkerLoad`), so long downloads spread evenly
over the workers instead of going to whichever the kernel woke first.

The supervisor restarts a worker that dies, after a growing delay, forwards
SIGHUP (certificate reload), and on SIGTERM stops every worker gracefully
before exiting itself.  A worker whose supervisor vanishes (even by SIGKILL)
sees its standard input close and stops too, so no process is left behind.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from typing import Any, cast

from twisted.application import service
from twisted.internet import protocol, stdio, tcp
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from dockmirror._interfaces import INotifier
from dockmirror.config import EMBEDDED, Config, listeners
from dockmirror.coordination import SERVICE_FILES
from dockmirror.metrics import MULTIPROCESS_DIRECTORY, mark_worker_dead
from dockmirror.tls import tls_endpoint

log = Logger()

#: A worker's descriptor for messages to its supervisor (it hears from it on stdin) ...
CHANNEL_FD = 3
#: ... and that of the first inherited listening socket.
FIRST_FD = 4
#: The longest message between workers, in bytes.
MAX_MESSAGE = 4096
#: Seconds a worker must live for its restarts to count as a fresh start.
STABLE_AFTER = 60.0
#: The longest wait before restarting a worker that keeps dying.
MAX_BACKOFF = 30.0
#: Seconds a stopping worker gets before it is killed (its fills get 30).
STOP_TIMEOUT = 40.0
#: The environment variable naming the file of the workers' open connections.
LOAD_FILE = "DOCKMIRROR_WORKER_LOAD"
#: Seconds a worker with more connections than another leaves a new one to the others.
YIELD_ACCEPT = 0.05
#: What a dead worker's slot holds, so no live worker leaves connections to it.
_GONE = 1 << 62
#: twistd options a worker must not share with its supervisor, and those of them
#: that take no value.
_SUPERVISOR_ONLY = ("--pidfile", "--logfile", "-l", "--nodaemon", "-n", "--syslog")
_FLAGS = ("--nodaemon", "-n", "--syslog")


def inherited(config: Config) -> list[str]:
    """Every listening endpoint string, in the order workers inherit them."""
    return [d for _, descriptions in listeners(config) for d in descriptions]


class _Refuse(protocol.Factory):
    """Stands for the workers' factories on the supervisor's ports, which never accept."""

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


def worker_command(argv: list[str], python: str = sys.executable) -> list[str]:
    """How to start a worker, from how the supervisor was started.

    ``python -m twisted`` (twist) options are kept as they are; ``twistd``
    ones are too, but for the pid file, log file and daemonizing, which are
    the supervisor's: a worker stays in the foreground and logs to the
    output it inherits.
    """
    end = argv.index("dockmirror") if "dockmirror" in argv else len(argv)
    if argv[0].endswith("__main__.py"):
        return [python, "-m", "twisted", *argv[1:end]]
    kept = [python, argv[0], "--nodaemon", "--pidfile="]
    options = iter(argv[1:end])
    for option in options:
        name = option.partition("=")[0]
        if name not in _SUPERVISOR_ONLY:
            kept.append(option)
        elif "=" not in option and name not in _FLAGS:
            next(options, None)  # its value
    return kept


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, supervisor: Supervisor, number: int, started: float) -> None:
        self.supervisor = supervisor
        self.number = number
        self.started = started
        self.pid: int | None = None
        self._buffer = b""

    def connectionMade(self) -> None:
        self.pid = self.transport.pid if self.transport is not None else None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != CHANNEL_FD:
            return
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        if len(self._buffer) > MAX_MESSAGE:
            self._buffer = b""
        for line in lines:
            if line and len(line) <= MAX_MESSAGE:
                self.supervisor.relay(self, line)

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.ended(self, reason)


class Supervisor(service.Service):
    """Binds the listeners and keeps :attr:`count` workers serving them."""

    name = "workers"

    def __init__(self, reactor: Any, config: Config, argv: list[str]) -> None:
        self._reactor = reactor
        self.config = config
        self.count = config.server.worker_count
        self._argv = argv
        self._ports: list[IListeningPort] = []
        self._workers: dict[int, _WorkerProtocol] = {}
        self._failures: dict[int, int] = {}
        self._metrics_dir: str | None = None
        self._load_file = ""
        self._stopped: Deferred[None] | None = None
        self._previous_hup: Any = None

    def __repr__(self) -> str:
        pids = sorted(w.pid for w in self._workers.values() if w.pid is not None)
        return f"<Supervisor {len(pids)}/{self.count} workers: {pids}>"

    def privilegedStartService(self) -> None:
        """Bind every listener before twistd drops privileges."""
        super().privilegedStartService()
        self._bind()

    def _bind(self) -> None:
        if self._ports:
            return
        for description in inherited(self.config):
            endpoint, _ = tls_endpoint(self._reactor, description)
            results: list[Any] = []
            endpoint.listen(_Refuse()).addBoth(results.append)
            (result,) = results  # stream endpoints listen at once
            if isinstance(result, Failure):
                result.raiseException()
            result.stopReading()  # the workers accept, not us
            self._ports.append(result)

    def startService(self) -> None:
        self._bind()  # twist has no privileged start
        super().startService()
        self._metrics_dir = tempfile.mkdtemp(prefix="dockmirror-metrics-")
        self._load_file = os.path.join(self._metrics_dir, "worker-load")
        with open(self._load_file, "wb") as f:
            f.write(bytes(8 * self.count))
        # The first worker to start counts the cache's usage afresh; the warming one keeps.
        for name in SERVICE_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.config.cache.directory, name))
        self._previous_hup = signal.signal(signal.SIGHUP, self._hangup)
        for number in range(self.count):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        assert self._metrics_dir is not None
        args = [*worker_command(self._argv), "dockmirror", "--worker", str(number)]
        if self.config.source != EMBEDDED:
            args[-2:-2] = ["--config", os.path.abspath(self.config.source)]
        fds: dict[int, int | str] = {0: "w", 1: 1, 2: 2, CHANNEL_FD: "r"}
        for offset, port in enumerate(self._ports):
            fds[FIRST_FD + offset] = port.fileno()  # type: ignore[attr-defined]
        worker = _WorkerProtocol(self, number, self._reactor.seconds())
        env = {
            **os.environ,
            MULTIPROCESS_DIRECTORY: self._metrics_dir,
            LOAD_FILE: self._load_file,
        }
        self._reactor.spawnProcess(worker, sys.executable, args, env=env, childFDs=fds)
        self._workers[number] = worker
        log.info("started worker {number} (pid {pid})", number=number, pid=worker.pid)

    def ended(self, worker: _WorkerProtocol, reason: Failure) -> None:
        if self._workers.get(worker.number) is worker:
            del self._workers[worker.number]
        if worker.pid is not None and self._metrics_dir is not None:
            mark_worker_dead(worker.pid, self._metrics_dir)
            WorkerLoad.mark_gone(self._load_file, worker.number)
        if self._stopped is not None:
            if not self._workers:
                self._stopped.callback(None)
            return
        log.warn(
            "worker {number} (pid {pid}) ended: {reason}",
            number=worker.number,
            pid=worker.pid,
            reason=reason.getErrorMessage(),
        )
        if self._reactor.seconds() - worker.started >= STABLE_AFTER:
            self._failures[worker.number] = 0
        failures = self._failures[worker.number] = self._failures.get(worker.number, 0) + 1
        delay = min(MAX_BACKOFF, 0.5 * 2 ** (failures - 1))
        log.info("restarting worker {number} in {delay}s", number=worker.number, delay=delay)
        self._reactor.callLater(delay, self._respawn, worker.number)

    def relay(self, sender: _WorkerProtocol, line: bytes) -> None:
        """Pass a worker's message on to every other worker."""
        for worker in list(self._workers.values()):
            if worker is not sender and worker.transport is not None:
                worker.transport.writeToChild(0, line + b"\n")

    def _respawn(self, number: int) -> None:
        if self._stopped is None and number not in self._workers:
            self._spawn(number)

    def _hangup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._signal_all, "HUP")

    def _signal_all(self, name: str) -> None:
        for worker in list(self._workers.values()):
            try:
                worker.transport.signalProcess(name)  # type: ignore[union-attr]
            except (ProcessExitedAlready, OSError, AttributeError) as e:  # ended meanwhile
                log.debug("cannot signal worker: {error}", error=e)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        self._stopped = Deferred()
        if not self._workers:
            self._stopped.callback(None)
        self._signal_all("TERM")
        kill = self._reactor.callLater(STOP_TIMEOUT, self._signal_all, "KILL")
        stopped = self._stopped

        def done(result: object) -> object:
            if kill.active():
                kill.cancel()
            if self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
            return DeferredList([maybeDeferred(port.stopListening) for port in self._ports])

        return stopped.addCallback(done)


class WorkerLoad:
    """The connections each worker has open, in a file every worker maps.

    Slot N (8 bytes) is worker N's; a worker writes only its own, with the
    count of its :attr:`ports`' connections each time it decides on a new
    one (all workers are woken for each) and after it accepted one, and
    reads the others'.  The supervisor creates the file and marks a dead
    worker's slot, so nobody leaves connections to it.
    """

    def __init__(self, path: str, number: int, count: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._map = mmap.mmap(fd, 8 * count)
        finally:
            os.close(fd)
        self._slots = memoryview(self._map).cast("q")
        self.number = number
        self.ports: list[Any] = []
        self._slots[number] = 0

    @classmethod
    def inherited(cls, number: int, count: int) -> WorkerLoad | None:
        """This worker's view of the file its supervisor made, if there is one."""
        path = os.environ.get(LOAD_FILE)
        return cls(path, number, count) if path else None

    @staticmethod
    def mark_gone(path: str, number: int) -> None:
        """Fill dead worker *number*'s slot, until its successor starts."""
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, _GONE.to_bytes(8, sys.byteorder, signed=True), 8 * number)
            finally:
                os.close(fd)

    def tell(self) -> int:
        """Write this worker's count of open connections in its slot."""
        mine = self._slots[self.number] = sum(
            len(getattr(port.factory, "protocols", ())) for port in self.ports
        )
        return mine

    def busier(self) -> bool:
        """Whether another worker has fewer connections open than this one."""
        mine = self.tell()
        return any(n < mine for i, n in enumerate(self._slots) if i != self.number)


class BalancedPort(tcp.Port):
    """A listening TCP socket shared with other workers, taken by the least busy.

    A worker with more connections than another waits :data:`YIELD_ACCEPT`
    seconds before accepting, so that one takes the connection; then it
    accepts whatever is left itself, so a stuck worker delays connections
    by no more than that.  One connection per readiness: each is decided on
    afresh.
    """

    load: WorkerLoad
    yield_seconds = YIELD_ACCEPT
    _waiting: IDelayedCall | None = None

    def doRead(self) -> None:
        if self._waiting is not None:
            return
        if self.load.busier():
            self.stopReading()
            clock = cast(IReactorTime, self.reactor)
            self._waiting = clock.callLater(self.yield_seconds, self._accept_late)
            return
        self._accept()

    def _accept_late(self) -> None:
        self._waiting = None
        if self.connected and not self.disconnecting:
            self._accept()
            self.startReading()

    def _accept(self) -> None:
        self.numberAccepts = 1
        super().doRead()
        self.load.tell()

    def connectionLost(self, reason: Failure) -> None:
        if self._waiting is not None and self._waiting.active():
            self._waiting.cancel()
        self._waiting = None
        super().connectionLost(reason)


class AdoptedPort(service.Service):
    """Serves a listening socket inherited from the supervisor.

    With *load*, a TCP socket is served by a :class:`BalancedPort`.
    """

    def __init__(
        self, reactor: Any, fd: int, factory: IProtocolFactory, load: WorkerLoad | None = None
    ) -> None:
        self._reactor = reactor
        self.fd = fd
        self.factory = factory
        self.load = load
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        sock = socket.socket(fileno=self.fd)
        family = sock.family
        sock.detach()
        if self.load is not None and family in (socket.AF_INET, socket.AF_INET6):
            # What reactor.adoptStreamPort does, with this port class.
            port = BalancedPort._fromListeningDescriptor(
                self._reactor, self.fd, family, self.factory
            )
            port.load = self.load
            port.startListening()
            self.load.ports.append(port)
            self.port = port
        else:
            self.port = self._reactor.adoptStreamPort(self.fd, family, self.factory)
        os.close(self.fd)  # the port holds its own copy

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None


class _Channel(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_MESSAGE

    def __init__(self, service: SupervisorChannel) -> None:
        self.service = service

    def lineReceived(self, line: bytes) -> None:
        self.service.received(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        log.warn("dropped a message of {length} bytes from the supervisor", length=len(line))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.service.parent_gone()


@implementer(INotifier)
class SupervisorChannel(service.Service):
    """A worker's line to its supervisor, which passes its messages on to the others.

    Messages go out on :data:`CHANNEL_FD` and come in on standard input, one
    JSON list per line.  When the supervisor's end closes, the supervisor is
    gone (even by SIGKILL): the worker stops.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._listeners: dict[str, list[Callable[[list[str]], None]]] = {}
        self._channel: _Channel | None = None

    def startService(self) -> None:
        super().startService()
        self._channel = _Channel(self)
        # mypy reads the Windows signature; POSIX's takes the descriptors.
        stdio.StandardIO(  # type: ignore[call-arg]
            self._channel, stdin=0, stdout=CHANNEL_FD, reactor=self._reactor
        )

    def publish(self, topic: str, message: list[str]) -> None:
        line = json.dumps([topic, message]).encode()
        if self._channel is not None and len(line) <= MAX_MESSAGE:
            self._channel.sendLine(line)

    def subscribe(self, topic: str, listener: Callable[[list[str]], None]) -> None:
        self._listeners.setdefault(topic, []).append(listener)

    def received(self, line: bytes) -> None:
        try:
            topic, message = json.loads(line)
        except (ValueError, TypeError):
            return
        if (
            isinstance(topic, str)
            and isinstance(message, list)
            and all(isinstance(m, str) for m in message)
        ):
            for listener in self._listeners.get(topic, []):
                listener(message)

    def parent_gone(self) -> None:
        self._channel = None
        if self.running:  # not stopping already
            log.info("the supervisor is gone; stopping")
            self._reactor.stop()
