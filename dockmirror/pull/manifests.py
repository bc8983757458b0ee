"""Manifests: by digest from the cache, by tag for ``manifest_ttl`` then revalidated.

A tag is revalidated with a ``HEAD``, which Docker Hub does not count as a
pull; an expired tag is served stale while the upstream fails, if allowed.
A tag is fetched, and revalidated, by one process for every worker and
every node of a cluster (:class:`dockmirror.coordination.SharedFlights`).
In a cluster, a tag another node resolved is taken from PostgreSQL (stale,
if need be, while the upstream fails), and a manifest from the storage
bucket once its repository proved, to any node, that it has it.
"""

from __future__ import annotations

from twisted.internet.task import deferLater
from twisted.logger import Logger

from dockmirror.cache import origin_of
from dockmirror.cache.manifests import (
    TagEntry,
    accepted,
    could_be_manifest,
    manifest_media_type,
    valid_digest,
)
from dockmirror.coordination import FLIGHT_RECENT
from dockmirror.errors import RegistryError, upstream_unavailable
from dockmirror.logs import printable
from dockmirror.pull.access import (
    CACHE_TIER,
    HIT,
    MISS,
    REVALIDATED,
    SHARED,
    STALE,
    Reply,
    UpstreamAccess,
    compute_digest,
    content_length,
    header,
    names,
    transient,
)
from dockmirror.reference import HEX_LENGTH, is_digest
from dockmirror.routing import Route
from dockmirror.upstream import discard

log = Logger()

#: The largest manifest accepted from an upstream (as distribution's limit).
MANIFEST_LIMIT = 4 << 20
#: What a tag's revalidation tells when the tag names a manifest to fetch.
FETCH = "fetch"
#: Looks in the cluster's shared tags for a manifest another node fetched, and
#: seconds between them (its news may come before the row).
HEARD_TRIES = 10
HEARD_INTERVAL = 0.1

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
)
DEFAULT_ACCEPT = ", ".join(MANIFEST_TYPES)


def negotiable(accept: str | None) -> str:
    """The Accept header to send upstream for a client's manifest request.

    A client that names no manifest type (curl's ``*/*``) gets every type:
    some registries answer 404 to a request that does not name the type a
    manifest is stored as.
    """
    if accept and any(t in accept for t in MANIFEST_TYPES):
        return accept
    return DEFAULT_ACCEPT


class ManifestService(UpstreamAccess):
    """Manifests from the cache, fetched from the upstream once however many clients ask."""

    async def manifest(self, route: Route, reference: str, accept: str | None, head: bool) -> Reply:
        reply = await self._manifest(route, origin_of(route), reference, accept, head)
        self._count("manifest", reply.headers["X-Cache"])
        if reply.headers["X-Cache"] == STALE:
            self._metrics.cache_stale.inc()
        return reply

    async def _manifest(
        self, route: Route, origin: str, reference: str, accept: str | None, head: bool
    ) -> Reply:
        manifests = self.cache.manifests
        # Concurrent requests for the same thing share one upstream request.
        key = (origin, reference, negotiable(accept), head)
        if is_digest(reference):
            shared = (
                self.cache.storage is not None
                and not manifests.has(reference)
                and await self._flights.run(
                    ("stored", origin, reference),
                    lambda: self._stored_manifest(route, origin, reference, accept),
                )
            )
            if manifests.has(reference):
                if not self.cache.blobs.allowed(origin, reference):
                    await self._flights.run(
                        ("confirm", *key),
                        lambda: self._confirm_manifest(route, origin, reference, accept),
                    )
                reply = self._cached_manifest(reference, HIT, head)
                if reply is not None:
                    if shared:
                        reply.headers[CACHE_TIER] = SHARED
                    return reply
        else:
            entry = manifests.tag(origin, reference, accepted(accept))
            if (entry is None or not manifests.fresh(entry)) and await manifests.adopt_tag(
                origin, reference
            ):
                entry = manifests.tag(origin, reference, accepted(accept))
            reply = None
            if entry is not None and manifests.fresh(entry):
                reply = self._cached_manifest(entry.digest, HIT, head)
            elif entry is not None:
                reply = await self._flights.run(
                    ("revalidate", *key),
                    lambda: self._revalidate(route, origin, reference, entry, accept, head),
                )
            if reply is not None:
                return reply
        try:
            return await self._flights.run(
                ("fetch", *key),
                lambda: self._fetch_manifest(route, origin, reference, accept, head),
            )
        except RegistryError as e:
            if is_digest(reference) or not transient(e) or not self.cache.serve_stale:
                raise
            # A tag this node never resolved, or whose entry expired: another
            # node's entry, however old, rides out the upstream's failure.
            await manifests.adopt_tag(origin, reference, stale=True)
            return self._stale(manifests.tag(origin, reference, accepted(accept)), e, head)

    async def _fetch_manifest(
        self,
        route: Route,
        origin: str,
        reference: str,
        accept: str | None,
        head: bool,
        recent: float | None = None,
    ) -> Reply:
        """A manifest from upstream, fetched by one worker for all.

        Docker Hub counts each manifest GET against the pull limit: the
        worker that claims the fetch asks, and the others read the manifest
        it cached.  A HEAD costs nothing and caches nothing.  A fetch heard
        less than *recent* seconds ago is taken as it is (by default, within
        :data:`FLIGHT_RECENT`, and a tag's TTL); a refresh takes none.
        """
        if head:
            return await self._upstream_manifest(route, origin, reference, accept, head)
        flights = self.cache.flights
        key = "\n".join((origin, reference, negotiable(accept)))
        # Once for the cluster: its nodes share tags, and copy manifests from one another.
        if recent is None:
            recent = FLIGHT_RECENT if is_digest(reference) else self._recent()
        fetched = await flights.wait(key, True, recent)
        if fetched is not None and len(fetched) == 4:  # taken in, if sound, as it was heard
            digest = fetched[2]
            if await self._heard(origin, reference, digest, fetched[3]):
                reply = self._cached_manifest(digest, MISS, head)
                if reply is not None:
                    return reply
        result = None
        try:
            reply = await self._upstream_manifest(route, origin, reference, accept, head)
            digest = reply.headers["Docker-Content-Digest"]
            if self.cache.manifests.has(digest):
                result = [origin, reference, digest, reply.headers["Content-Type"]]
            return reply
        finally:
            flights.done(key, result)

    def _cached_manifest(self, digest: str, x_cache: str, head: bool) -> Reply | None:
        try:
            cached = self.cache.manifests.get(digest)
        except OSError as e:
            log.error("cannot read cached {digest}: {error}", digest=digest, error=e.strerror)
            raise RegistryError("UNAVAILABLE", "the cache cannot be read now", status=503) from e
        if cached is None:
            return None
        body, media_type = cached
        headers = {
            "Content-Type": media_type,
            "Content-Length": str(len(body)),
            "Docker-Content-Digest": digest,
            "ETag": f'"{digest}"',
            "X-Cache": x_cache,
        }
        return Reply(200, headers, b"" if head else body)

    async def _stored_manifest(
        self, route: Route, origin: str, digest: str, accept: str | None
    ) -> bool:
        """Take a manifest into the cache from the shared storage tier; whether it was there.

        It is taken only if it matches its digest, and once the upstream
        repository confirmed it has it (a ``HEAD``, which Docker Hub does not
        count as a pull).
        """
        assert self.cache.storage is not None
        found = await self.cache.storage.read_small(digest, MANIFEST_LIMIT)
        if found is None:
            return False
        body, declared = found
        media_type = manifest_media_type(body, declared)
        if compute_digest(body, digest.partition(":")[0]) != digest or media_type is None:
            log.error("stored manifest {digest} is not that manifest: ignored", digest=digest)
            return False
        await self._confirm_manifest(route, origin, digest, accept)
        await self.cache.manifests.put(origin, digest, digest, media_type, body)
        return True

    async def _confirm_manifest(
        self, route: Route, origin: str, digest: str, accept: str | None
    ) -> None:
        """Check that this upstream repository has a manifest cached through another.

        Its proof to another node of the cluster is as good as its answer.
        """
        if await self.cache.blobs.proved_elsewhere(origin, digest):
            return
        response = await self._request(
            route, "HEAD", f"manifests/{digest}", {"Accept": negotiable(accept)}
        )
        if response.code != 200:
            raise await self._failure(route, response, "MANIFEST_UNKNOWN", True)
        discard(response)
        content_type = header(response, "content-type")
        if not (could_be_manifest(content_type) and names(response, digest)):
            raise self._not_a_manifest(route, digest, f"a {content_type} page")
        self.cache.blobs.allow(origin, digest)

    async def refresh_tag(self, route: Route, tag: str) -> Reply:
        """A tag's manifest as its upstream has it now, whatever the cache holds.

        The upstream is asked with a HEAD, which does not count against
        Docker Hub's pull limit; the manifest is fetched only when the HEAD
        names one that is not cached.
        """
        origin = origin_of(route)
        key = (origin, tag, DEFAULT_ACCEPT, False)
        entry = self.cache.manifests.tag(origin, tag, None)
        reply = await self._flights.run(
            ("revalidate", *key),
            lambda: self._revalidate(route, origin, tag, entry, None, False, recent=0.0),
        )
        if reply is None:
            reply = await self._flights.run(
                ("fetch", *key),
                lambda: self._fetch_manifest(route, origin, tag, None, False, recent=0.0),
            )
        if entry is not None and entry.digest != reply.headers.get("Docker-Content-Digest"):
            self.cache.manifests.expire_tag(origin, tag, reply.headers["Content-Type"])
        return reply

    def _recent(self) -> float:
        """Seconds another process's answer about a tag is taken as is: within its TTL."""
        return min(FLIGHT_RECENT, self.cache.manifests.ttl)

    async def _heard(self, origin: str, reference: str, digest: str, media_type: str) -> bool:
        """Whether *digest*, which another process resolved *reference* to, is cached here.

        One from another node is taken from the cluster's shared tags (by tag),
        or from a node that holds it (by digest); the row saying so may be
        written a moment after its news arrives.
        """
        manifests = self.cache.manifests
        for attempt in range(HEARD_TRIES):
            if manifests.has(digest) and self.cache.blobs.allowed(origin, digest):
                return True
            if manifests.shared is None:
                return False
            if attempt:
                await deferLater(self._reactor, HEARD_INTERVAL, lambda: None)
            if is_digest(reference):
                await manifests.adopt_manifest(origin, digest, media_type, MANIFEST_LIMIT)
            else:
                await manifests.adopt_tag(origin, reference)
        return False

    async def _revalidate(
        self,
        route: Route,
        origin: str,
        tag: str,
        entry: TagEntry | None,
        accept: str | None,
        head: bool,
        recent: float | None = None,
    ) -> Reply | None:
        """Check a tag with a HEAD, once for every worker and node; None when the manifest
        must be fetched.

        An expired *entry* is served stale when the upstream fails.  The
        result is told to the others: ``[origin, tag, digest, media type]``,
        or ``[origin, tag, FETCH]`` when the tag names a manifest not cached.
        One heard less than *recent* seconds ago (by default, within the
        tag's TTL) is taken as it is.
        """
        flights = self.cache.flights
        key = "\n".join(("revalidate", origin, tag, negotiable(accept)))
        recent = self._recent() if recent is None else recent
        heard = await flights.wait(key, cluster=True, recent=recent)
        if heard is not None and heard[2:] == [FETCH]:
            return None
        if heard is not None and len(heard) == 4 and await self._heard(origin, tag, *heard[2:]):
            reply = self._cached_manifest(heard[2], REVALIDATED, head)
            if reply is not None:
                return reply
        result = None
        try:
            reply = await self._check_tag(route, origin, tag, entry, accept, head)
            if reply is None:
                result = [origin, tag, FETCH]
            elif reply.headers["X-Cache"] == REVALIDATED:
                headers = reply.headers
                result = [origin, tag, headers["Docker-Content-Digest"], headers["Content-Type"]]
            return reply
        finally:
            flights.done(key, result)

    async def _check_tag(
        self,
        route: Route,
        origin: str,
        tag: str,
        entry: TagEntry | None,
        accept: str | None,
        head: bool,
    ) -> Reply | None:
        """Ask the upstream about a tag with a HEAD; None when the manifest must be fetched."""
        manifests = self.cache.manifests
        try:
            response = await self._request(
                route, "HEAD", f"manifests/{tag}", {"Accept": negotiable(accept)}
            )
        except RegistryError as e:
            return self._stale(entry, e, head)
        if response.code != 200:
            error = await self._failure(route, response, "MANIFEST_UNKNOWN", True)
            if response.code == 429 or response.code >= 500:
                return self._stale(entry, error, head)
            if response.code == 404:
                manifests.forget_tag(origin, tag)
            raise error
        discard(response)
        if not could_be_manifest(header(response, "content-type")):
            what = f"a {header(response, 'content-type')} page"
            return self._stale(entry, self._not_a_manifest(route, tag, what), head)
        digest = header(response, "docker-content-digest")
        if digest is None or not manifests.has(digest):
            return None
        if entry is not None and digest == entry.digest:
            media_type = entry.media_type
        else:
            media_type = manifests.get_type(digest)
        self.cache.blobs.allow(origin, digest)
        manifests.set_tag(origin, tag, digest, media_type)
        return self._cached_manifest(digest, REVALIDATED, head)

    def _stale(self, entry: TagEntry | None, error: RegistryError, head: bool) -> Reply:
        if entry is None or not self.cache.serve_stale:
            raise error
        reply = self._cached_manifest(entry.digest, STALE, head)
        if reply is None:
            raise error
        log.info("serving stale {digest}: {error}", digest=entry.digest, error=error.message)
        return reply

    async def _upstream_manifest(
        self, route: Route, origin: str, reference: str, accept: str | None, head: bool
    ) -> Reply:
        response = await self._request(
            route,
            "HEAD" if head else "GET",
            f"manifests/{reference}",
            {"Accept": negotiable(accept)},
        )
        if response.code != 200:
            raise await self._failure(route, response, "MANIFEST_UNKNOWN", head)
        declared = header(response, "content-type")
        if not could_be_manifest(declared):
            discard(response)
            raise self._not_a_manifest(route, reference, f"a {declared} page")
        content_type = _media_type(declared)
        digest = header(response, "docker-content-digest")
        if digest and not valid_digest(digest):
            discard(response)
            raise upstream_unavailable(
                route.upstream.name, "the manifest's Docker-Content-Digest is not a digest", 502
            )
        if head:
            discard(response)
            headers = {"Content-Type": content_type, "X-Cache": MISS}
            if digest:
                headers["Docker-Content-Digest"] = digest
            length = content_length(response)
            if length is not None:
                headers["Content-Length"] = str(length)
            return Reply(200, headers)
        body = await self._read(route, response, MANIFEST_LIMIT)
        expected = reference if is_digest(reference) else digest
        algorithm = expected.partition(":")[0] if expected else "sha256"
        actual = compute_digest(body, algorithm if algorithm in HEX_LENGTH else "sha256")
        if expected and actual != expected:
            self._metrics.digest_mismatches.labels(route.upstream.name).inc()
            log.error(
                "manifest {reference} of {repository} from {upstream} hashes to {actual}",
                reference=reference,
                repository=route.repository,
                upstream=route.upstream.name,
                actual=actual,
            )
            raise upstream_unavailable(
                route.upstream.name, f"manifest does not match its digest {expected}", 502
            )
        media_type = manifest_media_type(body, declared)
        if media_type is None:
            what = f"{len(body)} bytes of {declared or 'no declared type'}"
            raise self._not_a_manifest(route, reference, what)
        await self.cache.manifests.put(origin, reference, actual, media_type, body)
        if self.cache.storage is not None:
            self.cache.storage.put(actual, body, media_type)
        return Reply(
            200,
            {
                "Content-Type": media_type,
                "Docker-Content-Digest": actual,
                "ETag": f'"{actual}"',
                "X-Cache": MISS,
            },
            body,
        )

    def _not_a_manifest(self, route: Route, reference: str, what: str) -> RegistryError:
        """An upstream's 200 that is no manifest: a captive portal, a login page."""
        log.warn(
            "upstream {upstream} answered {what} for manifest {reference} of {repository}",
            upstream=route.upstream.name,
            what=printable(what),
            reference=reference,
            repository=route.repository,
        )
        return upstream_unavailable(route.upstream.name, "the answer is not a manifest", 502)


def _media_type(content_type: str | None) -> str:
    if not content_type:
        return MANIFEST_TYPES[0]
    return content_type.partition(";")[0].strip()
