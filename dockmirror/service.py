"""The mirror's service tree: what one process (or each worker) serves."""

from __future__ import annotations

import itertools
import os
import resource
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import DeferredList
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

from dockmirror._interfaces import INotifier
from dockmirror.auth.access import AccessControl
from dockmirror.auth.keys import KeyStoreError
from dockmirror.auth.keystore import FLUSH_INTERVAL, KeyBackend, KeyStore
from dockmirror.auth.throttle import LoginThrottle
from dockmirror.auth.tokens import (
    SIGNING_KEY_FILE,
    TokenService,
    load_signing_key,
    parse_signing_key,
)
from dockmirror.cache import Cache
from dockmirror.config import (
    Config,
    ConfigError,
    check_repository_prefix,
    config_warnings,
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
from dockmirror.health import (
    Check,
    HealthResource,
    cache_space,
    directory_writable,
    key_store,
    notifications,
)
from dockmirror.manhole import HOST_KEY_FILE, KeysConsole, load_host_key, manhole_factory
from dockmirror.metrics import Metrics, MetricsResource
from dockmirror.portal.service import build_portal
from dockmirror.pull import Prefetcher, PullService, Upstreams
from dockmirror.routing import build_router
from dockmirror.tls import PlainHTTPFactory, ReloadService, TLSFactory, listen_endpoint
from dockmirror.warm import Warmer
from dockmirror.web import MirrorSite, RootResource, build_root
from dockmirror.workers import FIRST_FD, AdoptedPort, SupervisorChannel, WorkerLoad

if TYPE_CHECKING:
    from dockmirror.cluster.database import Database
    from dockmirror.cluster.keys import PostgresKeys
    from dockmirror.cluster.notify import PostgresNotifier

log = Logger()

#: The copy of the cluster's token signing key, in the state directory.
CLUSTER_SIGNING_KEY_FILE = "cluster_token_signing_key.pem"


class PoolService(service.Service):
    """Closes the upstreams' connection pools when the mirror stops."""

    def __init__(self, pools: list[HTTPConnectionPool]) -> None:
        self.pools = pools

    def stopService(self) -> Any:
        super().stopService()
        return DeferredList([pool.closeCachedConnections() for pool in self.pools])


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
            "{n} connections (server.max_connections) may need {wanted} open files;"
            " the limit is {soft}",
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
    signing_key: ec.EllipticCurvePrivateKey | None = None,
) -> AccessControl:
    """Access control over *keys*, with the token service named after ``public_url``.

    Tokens are signed with *signing_key*, or the state directory's.
    """
    public_url = config.server.public_url.rstrip("/")
    if signing_key is None:
        signing_key = load_signing_key(state_directory(config) / SIGNING_KEY_FILE)
    tokens = TokenService(
        signing_key,
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
    top = service.MultiService()
    channel = SupervisorChannel(reactor) if worker is not None else None
    notifier: INotifier = channel or LocalNotifier()
    keys_at: str | KeyBackend = config.auth.database
    flush_interval = FLUSH_INTERVAL
    signing_key = None
    checks: dict[str, Check] = {}
    cluster = None
    if config.cluster.database is not None:
        cluster = _cluster(config, reactor, top, worker)
        notifier, keys_at, signing_key = cluster.notifier, cluster.keys, cluster.signing_key
        flush_interval = cluster.poll_interval
        checks["notifications"] = notifications(cluster.notifier)
    cache = Cache(config.cache, reactor, metrics, shared=worker is not None, storage=config.storage)
    cache.share(notifier)
    upstreams = Upstreams(egress, reactor, metrics)
    endpoints = {u.name: upstreams.endpoint_set(u) for u in router.upstreams}
    for endpoint_set in endpoints.values():
        endpoint_set.share(notifier)
    pull = PullService(upstreams, reactor, metrics, cache)
    cache.prefetcher = Prefetcher(router, pull)
    # Started first: it recovers the cache from disk before any request is served.
    cache.setServiceParent(top)
    node = None
    if config.cluster.database is not None and config.cluster.node_url is not None:
        from dockmirror.cluster.node import ClusterNode  # the optional cluster extra

        assert cluster is not None
        node = ClusterNode(config.cluster, cache, cluster.database, reactor)
        node.setServiceParent(top)  # after the cache, whose coordinator it wraps
    warmer = None
    if config.warm.images and not worker:  # the first worker warms for the service
        warmer = Warmer(config.warm, config.warm_images(), router, pull, cache, metrics, reactor)
        warmer.setServiceParent(top)  # after the cache, whose recovery it reads
    keys = KeyStore(keys_at, reactor, flush_interval)
    keys.share(notifier)
    keys.setServiceParent(top)
    if cluster is not None:  # notifications missed while not listening: reload now
        cluster.notifier.on_resync(keys.flush)
    access = build_access(config, keys, metrics, reactor, notifier, signing_key)
    root = build_root(router, pull, access, config.auth.required)
    health = HealthResource(
        {
            "cache_directory": directory_writable(config.cache.directory),
            "cache_space": cache_space(cache.blobs),
            "database" if keys.backend.shared else "key_store": key_store(keys),
            **checks,
        },
        {"upstreams": lambda: {name: e.status() for name, e in endpoints.items()}},
    )
    root.putChild(b"healthz", health)
    server = config.server
    timeouts = {
        "header_timeout": server.header_timeout,
        "idle_timeout": server.idle_timeout,
        "send_timeout": server.send_timeout,
    }
    # The service's connection limits, of which each worker serves its share.
    workers = 1 if worker is None else server.worker_count
    limits = ConnectionLimits(server.max_connections, server.max_connections_per_client, workers)
    _raise_file_limit(limits.total)
    clients = ClientAddresses(server.trusted_proxies, server.proxy_header)
    site = MirrorSite(root, metrics, clients, limits, **timeouts)
    certificates = []
    inherited = itertools.count(FIRST_FD)
    load = None if worker is None else WorkerLoad.inherited(worker, config.server.worker_count)

    def serve(description: str, factory: Any, http: bool = False) -> None:
        """Listen: on the endpoint, or on the socket a worker inherited for it."""
        endpoint, certificate = listen_endpoint(reactor, config, description)
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
        own = ConnectionLimits(server.max_connections, server.max_connections_per_client, workers)
        listen(config.metrics.listen, MirrorSite(operations, metrics, clients, own, **timeouts))
    else:
        root.putChild(b"metrics", metrics_resource)
    if node is not None and config.cluster.listen is not None:
        from dockmirror.cluster.listener import ClusterResource

        nodes = ConnectionLimits(server.max_connections, server.max_connections_per_client, workers)
        peers = MirrorSite(ClusterResource(cache.blobs, node), metrics, None, nodes, **timeouts)
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
        database = cluster.database if cluster is not None else None
        portal = build_portal(
            config,
            keys,
            metrics,
            cache,
            router,
            egress,
            check_prefix,
            reactor,
            top,
            notifier,
            database,
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
    if channel is not None:  # also when notifications go through PostgreSQL: it tells
        channel.setServiceParent(top)  # the worker that its supervisor is gone
    return top


@dataclass(frozen=True)
class _Cluster:
    #: The process's one pool: keys, notifications, the cache index, the portal.
    database: Database
    notifier: PostgresNotifier
    keys: PostgresKeys
    signing_key: ec.EllipticCurvePrivateKey
    poll_interval: float


def _cluster(
    config: Config, reactor: Any, top: service.MultiService, worker: int | None
) -> _Cluster:
    """The node's share of ``[cluster] database``: its connections, notifications, keys.

    The first worker says how many connections the node may need.
    """
    # Imported here: only a cluster needs (and has) the cluster extra.
    from dockmirror.cluster.database import Database, DatabaseService, connections_needed
    from dockmirror.cluster.keys import POLL_INTERVAL, PostgresKeys, cluster_signing_key
    from dockmirror.cluster.notify import PostgresNotifier, notification_key

    assert config.cluster.database is not None
    copy = state_directory(config) / CLUSTER_SIGNING_KEY_FILE
    pem = cluster_signing_key(config.cluster.database, copy)
    pool_size = config.cluster.pool_size
    database = Database(config.cluster.database, reactor, max_connections=pool_size)
    workers = 1 if worker is None else config.server.worker_count
    needed = None if worker else connections_needed(workers, pool_size)
    DatabaseService(database, needed).setServiceParent(top)
    notify_key = notification_key(pem)
    notifier = PostgresNotifier(database, reactor, notify_key)
    notifier.setServiceParent(top)
    keys = PostgresKeys(database, reactor, notify_key)
    signing_key = parse_signing_key(pem, repr(database))
    return _Cluster(database, notifier, keys, signing_key, POLL_INTERVAL)


def mirror_service(config: Config, reactor: Any, worker: int | None) -> service.MultiService:
    """:func:`build_service`, or the message twistd exits with when it cannot be built."""
    try:
        return build_service(config, reactor, worker)
    except (ConfigError, KeyStoreError, ValueError, OSError) as e:
        raise SystemExit(f"dockmirror: {e}") from None
