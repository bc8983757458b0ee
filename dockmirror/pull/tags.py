"""Tag lists, paginated with ``n`` and ``last`` whatever the upstream does."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, urlencode, urlsplit

from dockmirror import jsontext
from dockmirror.errors import RegistryError, upstream_unavailable
from dockmirror.pull.access import Reply, UpstreamAccess, header
from dockmirror.reference import TAG_RE
from dockmirror.routing import Route


class TagsService(UpstreamAccess):
    """The tags of a repository, as its upstream lists them now (never cached)."""

    async def tags(self, route: Route, n: str | None, last: str | None) -> Reply:
        """List tags with ``n``/``last`` pagination.

        Upstreams that ignore ``n`` (distribution 2.8 among them) return every
        tag; those lists are sorted and paginated here.
        """
        limit = _page_size(n)
        if last and not TAG_RE.fullmatch(last):
            raise RegistryError("TAG_INVALID", "last must be a tag", {"last": last[:200]})
        params = [(k, v) for k, v in (("n", n), ("last", last)) if v is not None]
        response = await self._request(route, "GET", "tags/list", params=params)
        if response.code != 200:
            raise await self._failure(route, response, "NAME_UNKNOWN", False)
        body = await self._read(route, response)
        try:
            tags = jsontext.loads(body)["tags"] or []
            if not all(isinstance(t, str) for t in tags):
                raise TypeError
        except (ValueError, KeyError, TypeError) as e:
            raise upstream_unavailable(route.upstream.name, "invalid tag list", 502) from e
        headers = {"Content-Type": "application/json"}
        link = header(response, "link")
        if link:
            headers["Link"] = _tags_link(route, _link_query(link))
        else:
            tags = sorted(tags)
            if last is not None:
                tags = [t for t in tags if t > last]
            if limit is not None and len(tags) > limit:
                tags = tags[:limit]
                if tags:
                    headers["Link"] = _tags_link(route, [("n", str(limit)), ("last", tags[-1])])
        body = json.dumps({"name": route.client_name, "tags": tags}).encode()
        return Reply(200, headers, body)


#: The largest page of tags a client may ask for with ``n``.
MAX_PAGE = 10_000


def _page_size(n: str | None) -> int | None:
    if n is None or n == "":
        return None
    if not (n.isascii() and n.isdigit()) or len(n) > 6 or int(n) > MAX_PAGE:
        raise RegistryError(
            "PAGINATION_NUMBER_INVALID",
            f"n must be an integer from 0 to {MAX_PAGE}",
            {"n": n[:20]},
        )
    return int(n)


def _link_query(link: str) -> list[tuple[str, str]]:
    """The ``n``/``last`` query of an upstream's pagination ``Link``."""
    target = link.partition("<")[2].partition(">")[0]
    return [(k, v) for k, v in parse_qsl(urlsplit(target).query) if k in ("n", "last")]


def _tags_link(route: Route, query: list[tuple[str, str]]) -> str:
    """The next page's ``Link``: on this mirror, to the upstream that served this page."""
    if route.ns is not None:
        query = [*query, ("ns", route.ns)]
    return f'</v2/{route.client_name}/tags/list?{urlencode(query)}>; rel="next"'
