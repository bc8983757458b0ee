"""Assembling the portal: its stores, sign-in providers, secrets and resource."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from twisted.application import service

from dockmirror.auth.keystore import KeyStore
from dockmirror.auth.secretfile import load_or_create
from dockmirror.config import Config, state_directory
from dockmirror.metrics import Metrics
from dockmirror.portal.api import overview_source
from dockmirror.portal.app import Portal
from dockmirror.portal.config import client_secret
from dockmirror.portal.login import GitHubProvider, OidcProvider, Provider
from dockmirror.portal.overview import TrafficSampler, UpstreamProbe
from dockmirror.portal.resource import PortalResource
from dockmirror.portal.sessions import (
    DATABASE_FILE,
    PortalDatabase,
    PortalStoreError,
    SessionStore,
)
from dockmirror.portal.users import UsersConsole
from dockmirror.routing import Upstream

#: Secrets made on first start, in the state directory.
SESSION_SECRET_FILE = "portal_session_secret"
CSRF_SECRET_FILE = "portal_csrf_secret"


def _secret(config: Config, name: str) -> bytes:
    return load_or_create(state_directory(config) / name, lambda: secrets.token_bytes(32))


def build_portal(
    config: Config,
    keys: KeyStore,
    http: Any,
    metrics: Metrics,
    cache: Any,
    upstreams: list[Upstream],
    check_prefix: Callable[[str], str],
    reactor: Any,
    parent: service.MultiService,
) -> tuple[PortalResource, UsersConsole]:
    """The ``/portal`` resource and the manhole's ``users``; services join *parent*."""
    portal_config = config.portal
    providers: list[Provider] = []
    if portal_config.login.github is not None:
        providers.append(
            GitHubProvider(
                portal_config.login.github,
                client_secret(portal_config.login.github),
                http,
                want_orgs=bool(portal_config.allowed_orgs),
            )
        )
    if portal_config.login.oidc is not None:
        providers.append(
            OidcProvider(
                portal_config.login.oidc, client_secret(portal_config.login.oidc), http, reactor
            )
        )
    path = state_directory(config) / DATABASE_FILE
    try:
        PortalDatabase(path).close()  # an unusable database stops start-up here
    except PortalStoreError as e:
        raise ValueError(str(e)) from None
    store = SessionStore(path, reactor)
    store.setServiceParent(parent)
    sampler = TrafficSampler(metrics, keys, reactor)
    sampler.setServiceParent(parent)
    portal = Portal(
        portal_config,
        config.server.public_url,
        keys,
        store,
        providers,
        _secret(config, SESSION_SECRET_FILE),
        _secret(config, CSRF_SECRET_FILE),
        reactor,
        check_prefix,
    )
    probe = UpstreamProbe(upstreams, http, reactor)
    overview = overview_source(portal, cache, metrics, probe, sampler, reactor)
    resource = PortalResource(portal, overview)
    return resource, UsersConsole(store, keys)
