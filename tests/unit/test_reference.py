import pytest

from dockmirror.errors import RegistryError
from dockmirror.reference import (
    V2Path,
    check_digest,
    check_name,
    parse_image_reference,
    parse_v2_path,
)

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    "name",
    ["nginx", "library/nginx", "ghcr.io/owner/img", "a-b/c__d/e.f", "a--b", "x" * 255],
)
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "Nginx", "../etc", "a/../b", "a//b", "-a", "a_", "a___b", "a/", "%2e%2e", "x" * 256],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(RegistryError) as e:
        check_name(name)
    assert e.value.code == "NAME_INVALID"
    assert e.value.status == 400


@pytest.mark.parametrize(
    "digest",
    ["sha256:" + "A" * 64, "sha256:" + "a" * 63, "md5:" + "a" * 32, "sha256", "sha256:../x"],
)
def test_invalid_digests(digest: str) -> None:
    with pytest.raises(RegistryError) as e:
        check_digest(digest)
    assert e.value.code == "DIGEST_INVALID"


def test_sha512_digest_is_accepted() -> None:
    assert check_digest("sha512:" + "0" * 128)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("", V2Path("base")),
        ("_catalog", V2Path("catalog")),
        ("library/nginx/manifests/latest", V2Path("manifests", "library/nginx", "latest")),
        (f"a/manifests/{DIGEST}", V2Path("manifests", "a", DIGEST)),
        (f"a/blobs/blobs/{DIGEST}", V2Path("blobs", "a/blobs", DIGEST)),
        ("a/manifests/tags/list", V2Path("tags", "a/manifests")),
        ("ghcr.io/o/i/tags/list", V2Path("tags", "ghcr.io/o/i")),
    ],
)
def test_parse_v2_path(path: str, expected: V2Path) -> None:
    segments = path.split("/") if path else []
    assert parse_v2_path(segments) == expected


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("a/manifests/-bad", "TAG_INVALID"),
        ("a/manifests/" + "t" * 129, "TAG_INVALID"),
        ("a/blobs/latest", "DIGEST_INVALID"),
        ("../../etc/passwd/blobs/" + DIGEST, "NAME_INVALID"),
        ("a/blobs/uploads/", "DIGEST_INVALID"),
        ("a/b", "NAME_UNKNOWN"),
        ("A/b", "NAME_INVALID"),
    ],
)
def test_parse_v2_path_errors(path: str, code: str) -> None:
    with pytest.raises(RegistryError) as e:
        parse_v2_path(path.split("/"))
    assert e.value.code == code
    assert 400 <= e.value.status < 500


def test_error_body_is_registry_json() -> None:
    import json

    body = json.loads(RegistryError("NAME_INVALID", "bad", {"name": "x"}).body())
    assert body == {"errors": [{"code": "NAME_INVALID", "message": "bad", "detail": {"name": "x"}}]}


@pytest.mark.parametrize(
    ("text", "name", "reference"),
    [
        ("nginx", "nginx", "latest"),
        ("library/nginx:1.25", "library/nginx", "1.25"),
        ("ghcr.io/owner/img:tag", "ghcr.io/owner/img", "tag"),
        (f"ghcr.io/owner/img@{DIGEST}", "ghcr.io/owner/img", DIGEST),
        (f"img:tag@{DIGEST}", "img", DIGEST),
    ],
)
def test_parse_image_reference(text: str, name: str, reference: str) -> None:
    ref = parse_image_reference(text)
    assert (ref.name, ref.reference) == (name, reference)
