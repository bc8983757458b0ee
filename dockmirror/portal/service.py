"""Assembling the portal: its stores, sign-in providers, secrets and resource."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.web.client import HTTPConnectionPool

from dockmirror._interfaces import INotifier
from dockmirror.auth.keystore import KeyStore
from dockmirror.auth.secretfile import load_or_create
from dockmirror.config import Config, state_directory
from dockmirror.egress import Egress, UpstreamTLS, upstream_egress
from dockmirror.metrics import Metrics
from dockmirror.portal.api import overview_source
from dockmirror.portal.app import Portal
from dockmirror.portal.config import client_secret
from dockmirror.portal.login import GitHubProvider, OidcProvider, Provider
from dockmirror.portal.overview import TrafficSampler, UpstreamProbe
from dockmirror.portal.resource import PortalResource
from dockmirror.portal.sessions import (
    CSRF_SECRET_FILE,
    DATABASE_FILE,
    SESSION_SECRET_FILE,
    PortalDatabase,
    PortalStore,
    PortalStoreError,
    SessionStore,
)
from dockmirror.portal.users import UsersConsole
from dockmirror.proxy import proxy_rules
from dockmirror.routing import Router

#: The copies of the cluster's portal secrets, in the state directory.
CLUSTER_COPY = "cluster_{}"


def _secret(config: Config, name: str) -> bytes:
    return load_or_create(state_directory(config) / name, lambda: secrets.token_bytes(32))


def _store(
    config: Config, database: Any, reactor: Any, parent: service.MultiService
) -> tuple[PortalStore, bytes, bytes]:
    """Where users and sessions are kept, and the secrets of cookies and CSRF tokens.

    In a cluster, the store and the secrets are the cluster database's, so
    that any node serves any signed-in browser.
    """
    if database is None:
        path = state_directory(config) / DATABASE_FILE
        try:
            PortalDatabase(path).close()  # an unusable database stops start-up here
        except PortalStoreError as e:
            raise ValueError(str(e)) from None
        store = SessionStore(path, reactor)
        store.setServiceParent(parent)
        return store, _secret(config, SESSION_SECRET_FILE), _secret(config, CSRF_SECRET_FILE)
    # Only a cluster has (and needs) the cluster extra.
    from dockmirror.cluster.keys import cluster_secret
    from dockmirror.cluster.portal import CSRF_SECRET, SESSION_SECRET, PostgresSessions

    shared = [
        cluster_secret(
            database.url,
            name,
            lambda: secrets.token_bytes(32),
            state_directory(config) / CLUSTER_COPY.format(file),
            f"the portal's {what} secret",
        )
        for name, file, what in (
            (SESSION_SECRET, SESSION_SECRET_FILE, "session"),
            (CSRF_SECRET, CSRF_SECRET_FILE, "CSRF"),
        )
    ]
    return PostgresSessions(database, reactor), shared[0], shared[1]


@dataclass(frozen=True)
class PortalParts:
    """What the server mounts and keeps: the resource, the manhole's ``users``, the pools."""

    resource: PortalResource
    users: UsersConsole
    #: The sign-in providers' connection pools, to close at stop.
    pools: list[HTTPConnectionPool]


def build_portal(
    config: Config,
    keys: KeyStore,
    metrics: Metrics,
    cache: Any,
    router: Router,
    egress: dict[str, Egress],
    check_prefix: Callable[[str], str],
    reactor: Any,
    parent: service.MultiService,
    notifier: INotifier | None = None,
    database: Any = None,
) -> PortalParts:
    """The portal, its services joining *parent*; *egress* holds each upstream's client.

    Sign-in and key creation attempts are counted in every process that
    *notifier* reaches.  With *database* (the cluster's
    :class:`~dockmirror.cluster.database.Database`), users, sessions and
    sign-ins in progress are kept there.

    Each sign-in provider gets its own client, whose connections may go where
    its configured URL points (and to public addresses), like an upstream's,
    through the proxy the environment names (``HTTPS_PROXY``, ``NO_PROXY``).
    """
    portal_config = config.portal
    providers: list[Provider] = []
    pools = []
    github, oidc = portal_config.login.github, portal_config.login.oidc
    proxies = proxy_rules(None, None, None, (), os.environ)
    if github is not None:
        client = upstream_egress(
            reactor, "portal login github", github.token_url, UpstreamTLS(), proxies=proxies
        )
        pools.append(client.pool)
        providers.append(
            GitHubProvider(
                github,
                client_secret(github),
                client.http,
                want_orgs=bool(portal_config.allowed_orgs),
            )
        )
    if oidc is not None:
        client = upstream_egress(
            reactor, "portal login oidc", oidc.issuer, UpstreamTLS(), proxies=proxies
        )
        pools.append(client.pool)
        providers.append(OidcProvider(oidc, client_secret(oidc), client.http, reactor))
    store, session_secret, csrf_secret = _store(config, database, reactor, parent)
    sampler = TrafficSampler(metrics, keys, reactor)
    sampler.setServiceParent(parent)
    portal = Portal(
        portal_config,
        config.server.public_url,
        keys,
        store,
        providers,
        session_secret,
        csrf_secret,
        reactor,
        check_prefix,
    )
    if notifier is not None:
        portal.share(notifier)
    probe = UpstreamProbe(router.upstreams, {n: e.http for n, e in egress.items()}, reactor)
    overview = overview_source(portal, cache, metrics, probe, sampler, reactor)
    return PortalParts(PortalResource(portal, overview), UsersConsole(store, keys), pools)
