"""OCI 1.1 referrers lists, followed across the upstream's pages and kept like a tag."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

from twisted.logger import Logger

from dockmirror.cache import origin_of
from dockmirror.cache.manifests import OCI_INDEX
from dockmirror.cache.referrers import ReferrersEntry, filtered_list, referrers_list
from dockmirror.errors import RegistryError, upstream_unavailable
from dockmirror.logs import printable
from dockmirror.pull.access import HIT, MISS, STALE, Reply, UpstreamAccess, header, transient
from dockmirror.pull.manifests import MANIFEST_LIMIT
from dockmirror.routing import Route

log = Logger()


class ReferrersService(UpstreamAccess):
    """The referrers of a manifest, asked of its upstream once per ``manifest_ttl``."""

    async def referrers(
        self, route: Route, digest: str, artifact_type: str | None, head: bool
    ) -> Reply:
        """The OCI 1.1 referrers list of *digest*, kept for ``manifest_ttl`` like a tag.

        An upstream without the API answers 404, and so does the mirror:
        clients then look for the tag schema (``sha256-<hex>.sig``).
        """
        origin = origin_of(route)
        key = (origin, digest, artifact_type or "")
        cache = self.cache.referrers
        entry = cache.get(key)
        if entry is not None and cache.fresh(entry):
            x_cache = HIT
        else:
            try:
                entry = await self._flights.run(
                    ("referrers", *key),
                    lambda: self._upstream_referrers(route, key, artifact_type),
                )
                x_cache = MISS
            except RegistryError as e:
                if entry is None or not self.cache.serve_stale or not transient(e):
                    raise
                log.info("serving stale referrers of {digest}: {error}", digest=digest, error=e)
                x_cache = STALE
        self._count("referrers", x_cache)
        headers = {
            "Content-Type": OCI_INDEX,
            "Content-Length": str(len(entry.body)),
            "X-Cache": x_cache,
        }
        if entry.filtered:
            headers["OCI-Filters-Applied"] = "artifactType"
        return Reply(200, headers, b"" if head else entry.body)

    async def _upstream_referrers(
        self, route: Route, key: tuple[str, str, str], artifact_type: str | None
    ) -> ReferrersEntry:
        """Ask the upstream, following its pages (``Link: <...>; rel="next"``) into one list."""
        origin, digest, _ = key
        params = [("artifactType", artifact_type)] if artifact_type else None
        descriptors: list[dict[str, Any]] = []
        for page in range(REFERRERS_PAGES):
            response = await self._request(
                route, "GET", f"referrers/{digest}", {"Accept": OCI_INDEX}, params
            )
            if response.code != 200:
                error = await self._failure(route, response, "MANIFEST_UNKNOWN", False)
                if response.code == 404 and page == 0:
                    self.cache.referrers.forget(key)
                    error = RegistryError(
                        error.code,
                        f"upstream {route.upstream.name} has no referrers API or no such"
                        " manifest; look for the tag schema (sha256-<hex> tags)",
                        error.detail,
                    )
                raise error
            body = await self._read(route, response, MANIFEST_LIMIT)
            content_type = header(response, "content-type")
            listed = referrers_list(body, content_type)
            if listed is None:
                log.warn(
                    "upstream {upstream} answered {size} bytes of {content_type} for the"
                    " referrers of {digest} in {repository}: not an image index",
                    upstream=route.upstream.name,
                    size=len(body),
                    content_type=printable(content_type or ""),
                    digest=digest,
                    repository=route.repository,
                )
                raise upstream_unavailable(
                    route.upstream.name, "the answer is not a referrers list", 502
                )
            if page == 0:
                applied = header(response, "oci-filters-applied") == "artifactType"
            descriptors.extend(listed)
            params = _next_page(route, digest, header(response, "link"))
            if params is None:
                break
        else:
            raise upstream_unavailable(
                route.upstream.name, f"more than {REFERRERS_PAGES} pages of referrers", 502
            )
        if artifact_type is not None and not applied:
            # The upstream ignored the filter; apply it here, and say so.
            body = filtered_list(descriptors, artifact_type)
        elif page > 0:
            body = filtered_list(descriptors, None)
        if len(body) > MANIFEST_LIMIT:
            raise upstream_unavailable(route.upstream.name, "too many referrers", 502)
        return self.cache.referrers.put(key, body, artifact_type is not None)


#: Pages of a referrers list followed at most.
REFERRERS_PAGES = 16


def _next_page(route: Route, digest: str, link: str | None) -> list[tuple[str, str]] | None:
    """The query of the next page of referrers an upstream's ``Link`` names, if any.

    Only a link to the same list on the same upstream is followed; its query
    is passed on as it is, bounded.
    """
    if link is None or 'rel="next"' not in link.replace(" ", ""):
        return None
    target = urlsplit(link.partition("<")[2].partition(">")[0])
    if target.netloc not in ("", urlsplit(route.base_url).netloc) or not target.path.endswith(
        f"/v2/{route.repository}/referrers/{digest}"
    ):
        log.warn(
            "upstream {upstream} links referrers to {target}: not followed",
            upstream=route.upstream.name,
            target=link[:200],
        )
        return None
    return [(k[:100], v[:1000]) for k, v in parse_qsl(target.query)[:10]]
