"""``twistd dockmirror``: options and the service tree."""

from __future__ import annotations

import itertools
import os
import resource
import sys
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import DeferredList
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import HTTPConnectionPool

from dockmirror._interfaces import INotifier
from dockmirror.auth.access import AccessControl
from dockmirror.auth.keystore import KeyStore, KeyStoreError
from dockmirror.auth.throttle import LoginThrottle
from dockmirror.auth.tokens import TokenService, load_signing_key
from dockmirror.cache import Cache
from dockmirror.config import (
    Config,
    ConfigError,
    check_repository_prefix,
    config_warnings,
    listeners,
    load,
    state_directory,
    upstream_plugins,
    upstream_proxies,
    upstream_tls,
)
from dockmirror.connections import ConnectionLimits
from dockmirror.control import control_service
from dockmirror.coordination import LocalNotifier
from dockmirror.egress import upstream_egress
from dockmirror.forwarded import ClientAddresses
from dockmirror.health import HealthResource, cache_space, directory_writable, key_store
from dockmirror.manhole import HOST_KEY_FILE, KeysConsole, load_host_key, manhole_factory
from dockmirror.metrics import Metrics, MetricsResource
from dockmirror.portal.service import build_portal
from dockmirror.pull import Prefetcher, PullService, Upstreams
from dockmirror.routing import build_router
from dockmirror.tls import PlainHTTPFactory, ReloadService, TLSFactory, tls_endpoint
from dockmirror.warm import Warmer
from dockmirror.web import MirrorSite, RootResource, build_root
from dockmirror.workers import (
    FIRST_FD,
    AdoptedPort,
    Supervisor,
    SupervisorChannel,
    WorkerLoad,
)

log = Logger()

#: The token signing key, in the state directory.
SIGNING_KEY_FILE = "token_signing_key.pem"


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
                    _endpoint(None, config, description, key)
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


class PoolService(service.Service):
    """Closes the upstreams' connection pools when the mirror stops."""

    def __init__(self, pools: list[HTTPConnectionPool]) -> None:
        self.pools = pools

    def stopService(self) -> Any:
        super().stopService()
        return DeferredList([pool.closeCachedConnections() for pool in self.pools])


def _endpoint(reactor: Any, config: Config, description: str, key: str = "server.listen") -> Any:
    try:
        return tls_endpoint(reactor, description)
    except ValueError as e:
        raise ConfigError(f"{config.source}: {key}: {description!r}: {e}") from None


#: File descriptors a client connection may need: its socket, a blob file, an upstream socket.
FILES_PER_CONNECTION = 3
#: File descriptors for everything else: databases, logs, listeners, idle upstream sockets.
FILES_SPARE = 256


def _raise_file_limit(max_connections: int) -> None:
    """Raise the soft limit on open files to what *max_connections* may need."""
    wanted = max_connections * FILES_PER_CONNECTION + FILES_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warn(
            "server.max_connections = {n} may need {wanted} open files; the limit is {soft}",
            n=max_connections,
            wanted=wanted,
            soft=soft,
        )


def build_access(
    config: Config,
    keys: KeyStore,
    metrics: Metrics,
    reactor: Any,
    notifier: INotifier | None = None,
) -> AccessControl:
    """Access control over *keys*, with the token service named after ``public_url``."""
    public_url = config.server.public_url.rstrip("/")
    tokens = TokenService(
        load_signing_key(state_directory(config) / SIGNING_KEY_FILE),
        issuer=public_url,
        service=urlsplit(public_url).netloc,
        ttl=config.auth.token_ttl,
        clock=reactor,
    )
    return AccessControl(
        keys,
        tokens,
        LoginThrottle(reactor, notifier=notifier),
        metrics,
        realm=f"{public_url}/docker-auth/token",
        anonymous_repos=config.auth.anonymous_repos,
    )


def build_service(config: Config, reactor: Any, worker: int | None = None) -> service.MultiService:
    """The mirror, or as worker *worker* of a supervisor, serving inherited sockets."""
    if not worker:  # the first worker speaks for the service
        for warning in config_warnings(config):
            log.warn("{source}: {warning}", source=config.source, warning=warning)
    router = build_router(config, upstream_plugins())
    egress = {
        u.name: upstream_egress(
            reactor,
            u.name,
            u.configured_url,
            upstream_tls(config.source, u.name, config.upstreams[u.name]),
            mirror_urls=tuple(m.url for m in u.mirrors),
            proxies=upstream_proxies(config.source, u.name, config.upstreams[u.name], os.environ),
            connect_timeout=u.connect_timeout,
        )
        for u in router.upstreams
    }
    metrics = Metrics()
    notifier: INotifier = LocalNotifier() if worker is None else SupervisorChannel(reactor)
    cache = Cache(config.cache, reactor, metrics, shared=worker is not None, storage=config.storage)
    cache.share(notifier)
    upstreams = Upstreams(egress, reactor, metrics)
    endpoints = {u.name: upstreams.endpoint_set(u) for u in router.upstreams}
    pull = PullService(upstreams, reactor, metrics, cache)
    cache.prefetcher = Prefetcher(router, pull)
    top = service.MultiService()
    # Started first: it recovers the cache from disk before any request is served.
    cache.setServiceParent(top)
    cluster = None
    if config.cluster.database is not None and config.cluster.node_url is not None:
        from dockmirror.cluster.node import ClusterNode  # the optional cluster extra

        cluster = ClusterNode(config.cluster, cache, reactor)
        cluster.setServiceParent(top)  # after the cache, whose coordinator it wraps
    warmer = None
    if config.warm.images and not worker:  # the first worker warms for the service
        warmer = Warmer(config.warm, config.warm_images(), router, pull, cache, metrics, reactor)
        warmer.setServiceParent(top)  # after the cache, whose recovery it reads
    keys = KeyStore(config.auth.database, reactor)
    keys.setServiceParent(top)
    access = build_access(config, keys, metrics, reactor, notifier)
    root = build_root(router, pull, access, config.auth.required)
    health = HealthResource(
        {
            "cache_directory": directory_writable(config.cache.directory),
            "cache_space": cache_space(cache.blobs),
            "key_store": key_store(keys),
        },
        {"upstreams": lambda: {name: e.status() for name, e in endpoints.items()}},
    )
    root.putChild(b"healthz", health)
    server = config.server
    timeouts = {"header_timeout": server.header_timeout, "idle_timeout": server.idle_timeout}
    _raise_file_limit(server.max_connections)
    limits = ConnectionLimits(server.max_connections, server.max_connections_per_client)
    clients = ClientAddresses(server.trusted_proxies, server.proxy_header)
    site = MirrorSite(root, metrics, clients, limits, **timeouts)
    certificates = []
    inherited = itertools.count(FIRST_FD)
    load = None if worker is None else WorkerLoad.inherited(worker, config.server.worker_count)

    def serve(description: str, factory: Any, http: bool = False) -> None:
        """Listen: on the endpoint, or on the socket a worker inherited for it."""
        endpoint, certificate = _endpoint(reactor, config, description)
        if http and certificate is None:
            factory = PlainHTTPFactory(factory)
        if worker is None:
            StreamServerEndpointService(endpoint, factory).setServiceParent(top)
        else:
            if certificate is not None:
                factory = TLSFactory(certificate, factory)
            AdoptedPort(reactor, next(inherited), factory, load).setServiceParent(top)
        if certificate is not None:
            certificates.append(certificate)

    def listen(descriptions: tuple[str, ...], site: MirrorSite) -> None:
        for description in descriptions:
            serve(description, site, http=True)

    listen(config.server.listen, site)
    metrics_resource = MetricsResource(metrics, config.metrics.allow)
    if config.metrics.listen:
        operations = RootResource()
        operations.putChild(b"metrics", metrics_resource)
        operations.putChild(b"healthz", health)
        own = ConnectionLimits(server.max_connections, server.max_connections_per_client)
        listen(config.metrics.listen, MirrorSite(operations, metrics, clients, own, **timeouts))
    else:
        root.putChild(b"metrics", metrics_resource)
    if cluster is not None and config.cluster.listen is not None:
        from dockmirror.cluster.listener import ClusterResource

        nodes = ConnectionLimits(server.max_connections, server.max_connections_per_client)
        peers = MirrorSite(ClusterResource(cache.blobs, cluster), metrics, None, nodes, **timeouts)
        serve(config.cluster.listen, peers, http=True)
    ReloadService(reactor, certificates).setServiceParent(top)
    if not worker:  # one control socket for the service, in the first worker
        control_service(reactor, state_directory(config), warmer).setServiceParent(top)
    pools = [e.pool for e in egress.values()]
    check_prefix = partial(check_repository_prefix, upstreams=config.upstreams)
    namespace: dict[str, Any] = {
        "keys": KeysConsole(keys, check_prefix),
        "upstreams": {upstream.name: upstream for upstream in router.upstreams},
        "endpoints": endpoints,
        "config": config,
        "cache": cache,
        "warm": warmer,
    }
    if config.portal.enabled:
        portal = build_portal(
            config, keys, metrics, cache, router, egress, check_prefix, reactor, top
        )
        root.putChild(b"portal", portal.resource)
        namespace["users"] = portal.users
        pools.extend(portal.pools)
    PoolService(pools).setServiceParent(top)
    if config.manhole.listen is not None:
        assert config.manhole.authorized_keys is not None  # the config check guarantees it
        factory = manhole_factory(
            namespace,
            Path(config.manhole.authorized_keys),
            load_host_key(state_directory(config) / HOST_KEY_FILE),
            reactor,
        )
        serve(config.manhole.listen, factory)
    if isinstance(notifier, SupervisorChannel):
        notifier.setServiceParent(top)
    return top


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
    try:
        if options["worker"] is None and config.server.worker_count > 1:
            return supervise(config, reactor)
        return build_service(config, reactor, options["worker"])
    except (ConfigError, KeyStoreError, ValueError, OSError) as e:
        raise SystemExit(f"dockmirror: {e}") from None
