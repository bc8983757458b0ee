"""Generate container images in OCI layout directories and move them with skopeo.

Image structure (manifests, configs, platforms) is deterministic; layer content is
random, so every generated image has unique digests.  Nothing here touches the
network except ``skopeo`` talking to registries on 127.0.0.1.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .registries import Credentials, subprocess_env

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
_CREATED = "2024-01-01T00:00:00Z"

Platform = tuple[str, str] | tuple[str, str, str]
"""``(os, architecture)`` or ``(os, architecture, variant)``."""


@dataclass(frozen=True)
class MediaTypes:
    """The media types used for one flavour of image."""

    manifest: str
    index: str
    config: str
    layer: str


OCI_MEDIA_TYPES = MediaTypes(OCI_MANIFEST, OCI_INDEX, OCI_CONFIG, OCI_LAYER)
DOCKER_MEDIA_TYPES = MediaTypes(DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_CONFIG, DOCKER_LAYER)


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob (config or layer) referenced by a manifest."""

    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class Layer(Blob):
    """A gzip'd tar layer; ``diff_id`` is the digest of the uncompressed tar."""

    diff_id: str


@dataclass(frozen=True)
class PlatformImage:
    """One single-platform image: its manifest, config and layers."""

    os: str
    architecture: str
    variant: str | None
    digest: str
    manifest: bytes
    media_type: str
    config: Blob
    layers: tuple[Layer, ...]


@dataclass(frozen=True)
class Image:
    """A generated image; ``digest``/``manifest`` are the top-level (tagged) ones.

    For a single-platform image ``platforms`` has one entry whose digest equals
    ``digest``; for a multi-platform image the top level is an index/list.
    """

    tag: str
    digest: str
    manifest: bytes
    media_type: str
    platforms: tuple[PlatformImage, ...]

    @property
    def is_index(self) -> bool:
        """Whether the top-level manifest is an image index / manifest list."""
        return len(self.platforms) != 1 or self.platforms[0].digest != self.digest

    @property
    def blobs(self) -> tuple[Blob, ...]:
        """All config and layer blobs of all platforms."""
        return tuple(blob for p in self.platforms for blob in (p.config, *p.layers))


class SkopeoError(RuntimeError):
    """A skopeo command failed; ``stderr`` holds its diagnostics."""

    def __init__(self, args: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"skopeo exited with {returncode}: {' '.join(args)}\n{stderr}")
        self.returncode = returncode
        self.stderr = stderr


def make_image(
    layout_dir: Path,
    tag: str,
    layers: Sequence[int] = (1024,),
    platforms: Sequence[Platform] | None = None,
    *,
    docker_media_types: bool = False,
) -> Image:
    """Write a new image tagged ``tag`` into the OCI layout at ``layout_dir``.

    ``layers`` gives the size in bytes of the random file in each layer.  With
    ``platforms`` an index (or Docker manifest list) of one image per platform
    is written; otherwise a single linux/amd64 manifest.  An existing layout
    is extended; an existing entry for ``tag`` is replaced.  Docker-typed
    images keep their Docker media type in ``index.json`` too (which skopeo's
    ``oci:`` transport ignores; :func:`push` copes).
    """
    types = DOCKER_MEDIA_TYPES if docker_media_types else OCI_MEDIA_TYPES
    blobs_dir = layout_dir / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    (layout_dir / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    images = tuple(
        _write_platform_image(blobs_dir, types, platform, layers)
        for platform in ([("linux", "amd64")] if platforms is None else platforms)
    )
    if platforms is None:
        (top,) = images
        digest, manifest, media_type = top.digest, top.manifest, top.media_type
    else:
        media_type = types.index
        manifest = _json_bytes(
            {
                "schemaVersion": 2,
                "mediaType": media_type,
                "manifests": [
                    {
                        **_descriptor(image.media_type, image.digest, len(image.manifest)),
                        "platform": _platform_json(image),
                    }
                    for image in images
                ],
            }
        )
        digest = _write_blob(blobs_dir, manifest)

    _tag_in_index(layout_dir, tag, _descriptor(media_type, digest, len(manifest)))
    return Image(tag, digest, manifest, media_type, images)


def push(
    layout_dir: Path,
    tag: str,
    registry: str,
    repo: str,
    creds: Credentials | None = None,
) -> None:
    """Copy ``tag`` from the layout to ``registry`` (``host:port``) as ``repo:tag``.

    All platforms are copied and digests are preserved (skopeo fails rather
    than converting a manifest).  skopeo 1.9's ``oci:`` transport only reads
    OCI-typed manifests, so Docker-typed images are pushed from a ``dir:``
    view of the layout instead.
    """
    descriptor = _tagged_descriptor(layout_dir, tag)
    with tempfile.TemporaryDirectory(prefix="skopeo-dir-") as view:
        if descriptor["mediaType"] in (OCI_MANIFEST, OCI_INDEX):
            source = f"oci:{layout_dir}:{tag}"
        else:
            _write_dir_view(layout_dir, str(descriptor["digest"]), Path(view))
            source = f"dir:{view}"
        skopeo(
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            *_creds_args("--dest-", creds),
            source,
            f"docker://{registry}/{repo}:{tag}",
        )


def pull(
    reference: str,
    dest_dir: Path,
    creds: Credentials | None = None,
    *,
    cert_dir: Path | None = None,
) -> None:
    """Copy ``reference`` (``host:port/repo:tag`` or ``...@digest``) to ``dir:dest_dir``.

    The ``dir:`` transport stores manifests of any media type verbatim
    (``manifest.json``, ``<hex>.manifest.json`` per platform, blobs named by
    hex digest), so the copy can be compared byte for byte.  All platforms
    are copied.  With ``cert_dir`` (a directory of CA certificates) the
    source is reached over TLS and verified against them; without, over
    plain HTTP.
    """
    tls = ["--src-tls-verify=false"] if cert_dir is None else ["--src-cert-dir", str(cert_dir)]
    skopeo(
        "copy",
        "--all",
        "--preserve-digests",
        *tls,
        *_creds_args("--src-", creds),
        f"docker://{reference}",
        f"dir:{dest_dir}",
    )


def inspect_raw(reference: str, creds: Credentials | None = None) -> bytes:
    """Return the raw manifest bytes of ``reference`` as served by the registry."""
    return skopeo(
        "inspect",
        "--raw",
        "--tls-verify=false",
        *_creds_args("--", creds),
        f"docker://{reference}",
    )


def skopeo(*args: str) -> bytes:
    """Run skopeo with ``args``; return stdout or raise :class:`SkopeoError`."""
    policy = [] if Path("/etc/containers/policy.json").exists() else ["--insecure-policy"]
    argv = ["skopeo", *policy, *args]
    result = subprocess.run(
        argv, capture_output=True, env=subprocess_env(), timeout=300, check=False
    )
    if result.returncode != 0:
        raise SkopeoError(argv, result.returncode, result.stderr.decode(errors="replace"))
    return result.stdout


def sha256_digest(data: bytes) -> str:
    """The ``sha256:<hex>`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _creds_args(prefix: str, creds: Credentials | None) -> list[str]:
    """skopeo credential flags; without creds, never fall back to auth files."""
    if creds is None:
        return [f"{prefix}no-creds"]
    return [f"{prefix}creds={creds[0]}:{creds[1]}"]


def _tagged_descriptor(layout_dir: Path, tag: str) -> dict[str, object]:
    index = json.loads((layout_dir / "index.json").read_bytes())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag:
            return dict(entry)
    raise KeyError(f"tag {tag!r} not in {layout_dir}/index.json")


def _write_dir_view(layout_dir: Path, digest: str, view: Path) -> None:
    """Lay out the image ``digest`` as skopeo's ``dir:`` transport expects."""
    blobs_dir = layout_dir / "blobs" / "sha256"
    manifest = (blobs_dir / digest.removeprefix("sha256:")).read_bytes()
    (view / "version").write_text("Directory Transport Version: 1.1\n")
    (view / "manifest.json").write_bytes(manifest)
    for child in json.loads(manifest).get("manifests", []):
        hex_digest = child["digest"].removeprefix("sha256:")
        (view / f"{hex_digest}.manifest.json").write_bytes((blobs_dir / hex_digest).read_bytes())
    for blob in blobs_dir.iterdir():
        (view / blob.name).symlink_to(blob)


def _write_platform_image(
    blobs_dir: Path, types: MediaTypes, platform: Platform, sizes: Sequence[int]
) -> PlatformImage:
    os_name, architecture, *rest = platform
    variant = rest[0] if rest else None
    layers = tuple(
        _write_layer(blobs_dir, types.layer, index, size) for index, size in enumerate(sizes)
    )
    config_json: dict[str, object] = {
        "created": _CREATED,
        "architecture": architecture,
        "os": os_name,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [
            {"created": _CREATED, "created_by": f"dockmirror test layer {index}"}
            for index in range(len(layers))
        ],
    }
    if variant is not None:
        config_json["variant"] = variant
    config_bytes = _json_bytes(config_json)
    config = Blob(_write_blob(blobs_dir, config_bytes), len(config_bytes), types.config)
    manifest = _json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": types.manifest,
            "config": _descriptor(config.media_type, config.digest, config.size),
            "layers": [_descriptor(layer.media_type, layer.digest, layer.size) for layer in layers],
        }
    )
    digest = _write_blob(blobs_dir, manifest)
    return PlatformImage(
        os_name, architecture, variant, digest, manifest, types.manifest, config, layers
    )


def _write_layer(blobs_dir: Path, media_type: str, index: int, size: int) -> Layer:
    """Write a gzip'd tar holding one file of ``size`` random bytes."""
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"layer{index}.bin")
        info.size = size
        info.mode = 0o644
        info.mtime = 0
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    tar_bytes = tar_buffer.getvalue()
    compressed = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
    digest = _write_blob(blobs_dir, compressed)
    return Layer(digest, len(compressed), media_type, sha256_digest(tar_bytes))


def _write_blob(blobs_dir: Path, data: bytes) -> str:
    digest = sha256_digest(data)
    (blobs_dir / digest.removeprefix("sha256:")).write_bytes(data)
    return digest


def _tag_in_index(layout_dir: Path, tag: str, descriptor: dict[str, object]) -> None:
    """Point ``tag`` at ``descriptor`` in the layout's ``index.json``."""
    index_path = layout_dir / "index.json"
    if index_path.exists():
        index = json.loads(index_path.read_bytes())
    else:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    index["manifests"] = [
        entry
        for entry in index["manifests"]
        if entry.get("annotations", {}).get(REF_NAME_ANNOTATION) != tag
    ]
    index["manifests"].append({**descriptor, "annotations": {REF_NAME_ANNOTATION: tag}})
    index_path.write_bytes(_json_bytes(index))


def _descriptor(media_type: str, digest: str, size: int) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest, "size": size}


def _platform_json(image: PlatformImage) -> dict[str, str]:
    platform = {"architecture": image.architecture, "os": image.os}
    if image.variant is not None:
        platform["variant"] = image.variant
    return platform


def _json_bytes(value: object) -> bytes:
    """Serialize a manifest/config; indented so any re-serialization changes digests."""
    return json.dumps(value, indent=3).encode()


COSIGN_SIGNATURE = "application/vnd.dev.cosign.simplesigning.v1+json"
COSIGN_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"


def signature_tag(digest: str) -> str:
    """The tag cosign gives the signature of ``digest``: ``sha256-<hex>.sig``."""
    return digest.replace(":", "-") + ".sig"


def make_signature(layout_dir: Path, subject: Image, tag: str) -> Image:
    """Write a cosign-style signature of ``subject`` into the layout, tagged ``tag``.

    As cosign writes it: an OCI manifest whose one layer is the simple-signing
    payload naming the subject's digest, with the signature in the layer's
    annotations.  It also carries the OCI 1.1 ``subject`` and
    ``artifactType``, so that it is a referrer of the subject too.
    """
    blobs_dir = layout_dir / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    (layout_dir / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    payload = _json_bytes(
        {
            "critical": {
                "identity": {"docker-reference": "mirror.test/signed"},
                "image": {"docker-manifest-digest": subject.digest},
                "type": "cosign container image signature",
            },
            "optional": {"nonce": os.urandom(8).hex()},
        }
    )
    payload_digest = _write_blob(blobs_dir, payload)
    layer = Layer(payload_digest, len(payload), COSIGN_SIGNATURE, payload_digest)
    config_bytes = _json_bytes(
        {
            "architecture": "",
            "os": "",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [payload_digest]},
        }
    )
    config = Blob(_write_blob(blobs_dir, config_bytes), len(config_bytes), OCI_CONFIG)
    signature = base64.b64encode(os.urandom(64)).decode()
    manifest = _json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": COSIGN_ARTIFACT,
            "config": _descriptor(OCI_CONFIG, config.digest, config.size),
            "layers": [
                {
                    **_descriptor(COSIGN_SIGNATURE, layer.digest, layer.size),
                    "annotations": {"dev.cosignproject.cosign/signature": signature},
                }
            ],
            "subject": _descriptor(subject.media_type, subject.digest, len(subject.manifest)),
        }
    )
    digest = _write_blob(blobs_dir, manifest)
    _tag_in_index(layout_dir, tag, _descriptor(OCI_MANIFEST, digest, len(manifest)))
    platform = PlatformImage("", "", None, digest, manifest, OCI_MANIFEST, config, (layer,))
    return Image(tag, digest, manifest, OCI_MANIFEST, (platform,))
