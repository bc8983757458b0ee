"""The distribution spec's grammar for repository names, tags and digests."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dockmirror.errors import RegistryError

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
NAME_MAX = 255
#: A media type (RFC 6838), as the referrers API's ``artifactType`` filter names one.
_RESTRICTED_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
MEDIA_TYPE_RE = re.compile(rf"{_RESTRICTED_NAME}/{_RESTRICTED_NAME}")

#: Digest algorithms this mirror can verify, with the length of their hex form.
HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[a-f0-9]+")


def check_name(name: str) -> str:
    if len(name) > NAME_MAX or not NAME_RE.fullmatch(name):
        raise RegistryError(
            "NAME_INVALID", "invalid repository name", {"name": name[: NAME_MAX + 1]}
        )
    return name


def is_digest(reference: str) -> bool:
    return ":" in reference


def check_digest(digest: str) -> str:
    """Return the digest if this mirror can verify it, else raise DIGEST_INVALID."""
    algorithm, _, hexpart = digest.partition(":")
    if (
        not DIGEST_RE.fullmatch(digest)
        or HEX_LENGTH.get(algorithm) != len(hexpart)
        or not _HEX_RE.fullmatch(hexpart)
    ):
        raise RegistryError(
            "DIGEST_INVALID", "invalid or unsupported digest", {"digest": digest[:200]}
        )
    return digest


def check_reference(reference: str) -> str:
    """A manifest reference: a tag or a digest."""
    if is_digest(reference):
        return check_digest(reference)
    if not TAG_RE.fullmatch(reference):
        raise RegistryError("TAG_INVALID", "invalid tag", {"tag": reference[:200]})
    return reference


def check_media_type(media_type: str) -> str:
    """A media type such as ``application/vnd.dev.cosign.artifact.sig.v1+json``."""
    if not MEDIA_TYPE_RE.fullmatch(media_type):
        raise RegistryError(
            "UNSUPPORTED",
            "artifactType must be a media type such as application/vnd.example+json",
            {"artifactType": media_type[:300]},
            status=400,
        )
    return media_type


@dataclass(frozen=True)
class V2Path:
    """A parsed ``/v2/...`` request path."""

    kind: str  # "base", "catalog", "manifests", "blobs", "referrers" or "tags"
    name: str = ""
    reference: str = ""


def parse_v2_path(segments: list[str]) -> V2Path:
    """Parse the path segments after ``/v2``, validating name and reference.

    Names may contain the words ``blobs`` or ``manifests``, so the path is read
    from its end, as the spec's route patterns are.
    """
    if segments and segments[-1] == "":
        segments = segments[:-1]
    if not segments:
        return V2Path("base")
    if segments == ["_catalog"]:
        return V2Path("catalog")
    if len(segments) >= 3:
        kind = segments[-2]
        name = "/".join(segments[:-2])
        if kind == "manifests":
            return V2Path("manifests", check_name(name), check_reference(segments[-1]))
        if kind == "blobs":
            return V2Path("blobs", check_name(name), check_digest(segments[-1]))
        if kind == "referrers":
            return V2Path("referrers", check_name(name), check_digest(segments[-1]))
        if kind == "tags" and segments[-1] == "list":
            return V2Path("tags", check_name(name))
    raise RegistryError(
        "NAME_UNKNOWN" if NAME_RE.fullmatch("/".join(segments)) else "NAME_INVALID",
        "no such registry endpoint",
        {"path": "/v2/" + "/".join(segments)[:300]},
        status=404,
    )


@dataclass(frozen=True)
class ImageReference:
    """A user-facing image reference such as ``ghcr.io/owner/img:tag``."""

    name: str
    reference: str


def parse_image_reference(text: str) -> ImageReference:
    """Split ``name[:tag][@digest]``; the tag defaults to ``latest``."""
    name, at, digest = text.partition("@")
    if at:
        check_digest(digest)
    last = name.rsplit("/", 1)[-1]
    tag = "latest"
    if ":" in last:
        name, _, tag = name.rpartition(":")
        check_reference(tag)
    check_name(name)
    return ImageReference(name, digest if at else tag)
