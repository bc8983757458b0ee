"""``[server] workers``: configuration, command lines, and what workers tell each other."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.protocols.policies import WrappingFactory

from dockmirror.auth.throttle import FAILED_TOPIC, LoginThrottle
from dockmirror.cache import PURGE_TOPIC, Cache
from dockmirror.config import EMBEDDED, CacheConfig, ConfigError, _build, load
from dockmirror.metrics import Metrics
from dockmirror.workers import (
    BalancedPort,
    SupervisorChannel,
    WorkerLoad,
    inherited,
    worker_command,
)

from ._cache_support import run_now


def test_one_worker_by_default():
    assert load(None).server.worker_count == 1


def test_auto_is_one_worker_per_usable_cpu(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    assert _build(EMBEDDED, {"server": {"workers": "auto"}}).server.worker_count == 3
    assert _build(EMBEDDED, {"server": {"workers": 4}}).server.worker_count == 4


@pytest.mark.parametrize("value", [0, -1, 65, "two", 1.5, True, [2]])
def test_bad_worker_counts_are_refused(value):
    with pytest.raises(ConfigError, match="server.workers"):
        _build("f.toml", {"server": {"workers": value}})


def test_workers_inherit_every_listener_in_order():
    config = _build(
        EMBEDDED,
        {
            "server": {"listen": ["tcp:1", "tcp:2"]},
            "metrics": {"listen": ["tcp:3"]},
            "manhole": {"listen": "tcp:4", "authorized_keys": "/k"},
        },
    )
    assert inherited(config) == ["tcp:1", "tcp:2", "tcp:3", "tcp:4"]


def test_a_worker_of_twist_keeps_its_options():
    argv = ["/x/twisted/__main__.py", "--log-format=text", "dockmirror", "--config", "c"]
    assert worker_command(argv, "py") == ["py", "-m", "twisted", "--log-format=text"]


def test_a_worker_of_twistd_stays_in_the_foreground_without_pid_or_log_file():
    argv = [
        "/venv/bin/twistd",
        "--pidfile",
        "/run/d.pid",
        "--logfile=/var/log/d.log",
        "-n",
        "--logger=dockmirror.logs.json_lines",
        "--syslog",
        "dockmirror",
        "--config",
        "c",
    ]
    assert worker_command(argv, "py") == [
        "py",
        "/venv/bin/twistd",
        "--nodaemon",
        "--pidfile=",
        "--logger=dockmirror.logs.json_lines",
    ]


class Notifier:
    """The other workers, played by the test."""

    def __init__(self) -> None:
        self.published: list[tuple[str, list[str]]] = []
        self.listeners: dict[str, object] = {}

    def publish(self, topic: str, message: list[str]) -> None:
        self.published.append((topic, message))

    def subscribe(self, topic: str, listener: object) -> None:
        self.listeners[topic] = listener


def test_failed_logins_are_told_and_heard(clock):
    notifier = Notifier()
    throttle = LoginThrottle(clock, notifier=notifier)
    throttle.failed("app_x" * 40, "192.0.2.1")
    assert notifier.published == [(FAILED_TOPIC, [("app_x" * 40)[:80], "192.0.2.1"])]
    heard = notifier.listeners[FAILED_TOPIC]
    for _ in range(9):
        heard(["app_y", "192.0.2.2"])  # type: ignore[operator]
    assert throttle.retry_after("app_y", "192.0.2.2") is None
    heard(["app_y", "192.0.2.2"])  # type: ignore[operator]
    assert throttle.retry_after("app_y", "192.0.2.2") is not None
    heard(["app_z"])  # type: ignore[operator]
    heard(["app_z", "192.0.2.3" * 20])  # type: ignore[operator]
    assert throttle.addresses.failures("client 192.0.2.3") == 0
    assert len(notifier.published) == 1  # what is heard is not told again


def test_a_worker_channel_passes_only_well_formed_messages():
    channel = SupervisorChannel(reactor=None)
    heard: list[list[str]] = []
    channel.subscribe("t", heard.append)
    for line in (
        b'["t", ["a", "b"]]',
        b"not json",
        b'["t", "a"]',
        b'["t", [1]]',
        b'[["t"], ["a"]]',
        b'["t"]',
        b'["other", ["a"]]',
    ):
        channel.received(line)
    assert heard == [["a", "b"]]


def test_purges_are_told_and_heard(tmp_path, clock):

    cache = Cache(
        CacheConfig(directory=str(tmp_path)), clock, Metrics(), run=run_now, run_index=run_now
    )
    notifier = Notifier()
    cache.share(notifier)
    digest = "sha256:" + "ab" * 32
    assert cache.purge(digest)["kept"] == {digest: "not cached"}
    assert notifier.published == [(PURGE_TOPIC, [digest])]
    notifier.listeners[PURGE_TOPIC]([digest])  # type: ignore[operator]
    notifier.listeners[PURGE_TOPIC](["x" * 400])  # type: ignore[operator]
    assert len(notifier.published) == 1


class Slots:
    """A stand-in for a port: its factory's open connections."""

    def __init__(self, open_connections: int) -> None:
        self.factory = WrappingFactory(Factory())
        self.factory.protocols = {object(): 1 for _ in range(open_connections)}  # type: ignore[misc]


def test_each_worker_sees_whether_another_has_fewer_connections(tmp_path):
    path = tmp_path / "load"
    path.write_bytes(bytes(8 * 3))
    workers = [WorkerLoad(str(path), number, 3) for number in range(3)]
    for worker, connections in zip(workers, [2, 2, 1], strict=True):
        worker.ports.append(Slots(connections))
    assert [worker.busier() for worker in workers] == [True, True, False]
    # Each tells its count as it decides on a connection: the third first here.
    workers[2].ports.append(Slots(1))
    assert [worker.busier() for worker in reversed(workers)] == [False, False, False]


def test_no_worker_leaves_connections_to_a_dead_one(tmp_path):
    path = tmp_path / "load"
    path.write_bytes(bytes(8 * 2))
    alive, dead = WorkerLoad(str(path), 0, 2), WorkerLoad(str(path), 1, 2)
    alive.ports.append(Slots(5))
    dead.busier()  # it had no connection
    WorkerLoad.mark_gone(str(path), 1)
    assert not alive.busier()
    WorkerLoad(str(path), 1, 2)  # its successor starts afresh
    assert alive.busier()


@pytest_twisted.ensureDeferred
async def test_a_busier_worker_leaves_new_connections_to_the_other(tmp_path, monkeypatch):
    monkeypatch.setattr(BalancedPort, "yield_seconds", 30.0)
    path = tmp_path / "load"
    path.write_bytes(bytes(16))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    ports = []
    for number, already_open in enumerate([0, 3]):
        factory = WrappingFactory(Factory.forProtocol(Protocol))
        factory.protocols = {Protocol(): 1 for _ in range(already_open)}  # type: ignore[misc]
        port = BalancedPort._fromListeningDescriptor(
            reactor, listener.fileno(), listener.family, factory
        )
        port.load = WorkerLoad(str(path), number, 2)
        port.load.ports.append(port)
        port.startListening()
        ports.append(port)
    listener.close()
    idle, busy = ports
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", busy.getHost().port)
    clients = [await connectProtocol(endpoint, Protocol()) for _ in range(3)]
    try:
        for _ in range(100):
            if len(idle.factory.protocols) == 3:
                break
            await deferLater(reactor, 0.02)
        assert len(idle.factory.protocols) == 3  # 3 and 3 now
        assert len(busy.factory.protocols) == 3  # only those it had
    finally:
        for client in clients:
            assert client.transport is not None
            client.transport.loseConnection()
        for port in ports:
            await port.stopListening()
        for protocol in list(idle.factory.protocols):
            protocol.transport.loseConnection()  # type: ignore[attr-defined]
        await deferLater(reactor, 0.05)
