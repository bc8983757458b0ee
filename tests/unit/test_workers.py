"""The supervisor's side of ``[server] workers``: configuration and worker command lines."""

from __future__ import annotations

import pytest

from dockmirror.config import EMBEDDED, ConfigError, _build, load
from dockmirror.workers import inherited, worker_command


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
