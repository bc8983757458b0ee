"""``twistd dockmirror``: options, and the service: the mirror, or the supervisor of its workers.

The supervisor imports only what it needs to read the configuration and bind
the listeners; the mirror's modules are imported where its service is built.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

from twisted.application import service
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python import usage

from dockmirror.config import Config, ConfigError, config_warnings, listeners, load
from dockmirror.tls import listen_endpoint
from dockmirror.workers import Supervisor

log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the dockmirror registry mirror. Without --config it serves plain "
        "HTTP on 127.0.0.1:5000 with the built-in upstreams."
    )
    optParameters = [
        ["config", "c", None, "Path to the TOML configuration file."],
        ["worker", None, None, "Serve as worker N of a supervisor (set by the supervisor).", int],
    ]
    optFlags = [
        ["check", None, "Validate the configuration, print a summary and exit."],
    ]

    def postOptions(self) -> None:
        try:
            config = self["parsed"] = load(self["config"])
            for key, descriptions in listeners(config):
                for description in descriptions:
                    listen_endpoint(None, config, description, key)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self["check"]:
            print(
                f"{config.source}: configuration OK"
                f" ({len(config.upstreams)} upstreams, listening on"
                f" {', '.join(config.server.listen)})"
            )
            for name, upstream in config.upstreams.items():
                print(f"  upstreams.{name}: {upstream!r}")
            for warning in config_warnings(config):
                print(f"warning: {config.source}: {warning}", file=sys.stderr)
            raise SystemExit(0)


def supervise(config: Config, reactor: Any) -> service.MultiService:
    """The supervisor of ``server.workers`` worker processes."""
    top = service.MultiService()
    Supervisor(reactor, config, sys.argv).setServiceParent(top)
    return top


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard limit.

    Every client reading a cached blob holds a file open, as does every fill
    and connection; the usual soft limit (1024) runs out long before the
    system's does.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or hard == resource.RLIM_INFINITY:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warn("cannot raise the open files limit from {soft}: {error}", soft=soft, error=e)
    else:
        log.info("open files limit raised from {soft} to {hard}", soft=soft, hard=hard)


def makeService(options: Options, reactor: IReactorCore | None = None) -> service.MultiService:
    raise_open_files_limit()
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    config = options["parsed"]
    if options["worker"] is None and config.server.worker_count > 1:
        return supervise(config, reactor)
    # Imported here, where it is built: the supervisor needs none of the mirror's modules.
    from dockmirror.memory import tune_allocator
    from dockmirror.service import mirror_service

    tune_allocator()

    return mirror_service(config, reactor, options["worker"])
