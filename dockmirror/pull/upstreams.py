"""The clients of each upstream: its endpoints (URL and mirrors), over its egress."""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IResponse

from dockmirror.egress import Egress
from dockmirror.endpoints import Breaker, Endpoint, EndpointSet
from dockmirror.metrics import Metrics
from dockmirror.routing import Route, Upstream
from dockmirror.upstream import UpstreamClient

#: Upstream clients kept: one per upstream and base URL, the most recently used.
CLIENTS_LIMIT = 64


class Upstreams:
    """The clients of each upstream: its endpoints (URL and mirrors), over its egress.

    A wildcard alias (``*.gcr.io``) names any number of hosts, each with a
    client of its own and no mirrors; only the :data:`CLIENTS_LIMIT` most
    recently used of those clients are kept.
    """

    def __init__(self, egress: dict[str, Egress], reactor: IReactorTime, metrics: Metrics) -> None:
        self._egress = egress
        self._reactor = reactor
        self._metrics = metrics
        self._clients: OrderedDict[tuple[str, str], UpstreamClient] = OrderedDict()
        self._endpoint_sets: dict[str, EndpointSet] = {}

    def _client(
        self,
        upstream: Upstream,
        base_url: str,
        username: str | None,
        password: str | None,
        token_realms: tuple[str, ...],
    ) -> UpstreamClient:
        return UpstreamClient(
            upstream.name,
            base_url,
            self._egress[upstream.name].http,
            self._reactor,
            self._metrics,
            username,
            password,
            token_realms=token_realms,
            trusted=self._egress[upstream.name].tls.trusted,
            connect_timeout=upstream.connect_timeout,
            read_timeout=upstream.read_timeout,
        )

    def endpoint_set(self, upstream: Upstream) -> EndpointSet:
        """The endpoints of *upstream*'s configured URL: it, then its mirrors.

        A mirror gets its own credentials only, and the primary's token
        realms are not its.
        """
        endpoints = self._endpoint_sets.get(upstream.name)
        if endpoints is None:
            primary = Endpoint(
                self._client(
                    upstream,
                    upstream.configured_url,
                    upstream.username,
                    upstream.password,
                    upstream.token_realms,
                ),
                primary=True,
                trust_tags=True,
                breaker=Breaker(self._reactor),
            )
            mirrors = [
                Endpoint(
                    self._client(upstream, m.url.rstrip("/"), m.username, m.password, ()),
                    primary=False,
                    trust_tags=m.trust_tags,
                    breaker=Breaker(self._reactor),
                )
                for m in upstream.mirrors
            ]
            endpoints = EndpointSet(
                upstream.name, [primary, *mirrors], self._reactor, self._metrics
            )
            self._endpoint_sets[upstream.name] = endpoints
        return endpoints

    def client(self, route: Route) -> UpstreamClient:
        key = (route.upstream.name, route.base_url)
        client = self._clients.get(key)
        if client is not None:
            self._clients.move_to_end(key)
            return client
        upstream = route.upstream
        client = self._clients[key] = self._client(
            upstream, route.base_url, upstream.username, upstream.password, upstream.token_realms
        )
        while len(self._clients) > CLIENTS_LIMIT:
            self._clients.popitem(last=False)
        return client

    async def request(
        self,
        route: Route,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        params: list[tuple[str, str]] | None = None,
    ) -> IResponse:
        """Send ``METHOD /v2/<repository>/<path>`` where *route* goes, falling back to mirrors."""
        if route.base_url == route.upstream.configured_url:
            endpoints = self.endpoint_set(route.upstream)
            return await endpoints.request(method, route.repository, path, headers, params)
        return await self.client(route).request(method, route.repository, path, headers, params)
