import base64
import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.task import Clock

from dockmirror.auth.tokens import (
    InvalidToken,
    TokenService,
    load_signing_key,
    requested_repositories,
)

SERVICE = "mirror.example.com"
ISSUER = "https://mirror.example.com"


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def tokens(key: ec.EllipticCurvePrivateKey, clock: Clock) -> TokenService:
    return TokenService(key, ISSUER, SERVICE, 300, clock)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def parts(token: str) -> tuple[dict, dict, str]:
    header, payload, signature = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return (
        json.loads(base64.urlsafe_b64decode(pad(header))),
        json.loads(base64.urlsafe_b64decode(pad(payload))),
        signature,
    )


def test_response_shape(tokens: TokenService) -> None:
    body = tokens.issue("app_x", ["library/alpine"], None)
    assert set(body) == {"token", "access_token", "expires_in", "issued_at"}
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300
    assert body["issued_at"] == "2023-11-14T22:13:20Z"
    header, claims, _ = parts(body["token"])
    assert header["alg"] == "ES256"
    assert claims["aud"] == SERVICE and claims["iss"] == ISSUER and claims["sub"] == "app_x"
    assert claims["exp"] - claims["iat"] == 300
    assert claims["access"] == [
        {"type": "repository", "name": "library/alpine", "actions": ["pull"]}
    ]
    assert "repositories" not in claims


def test_round_trip(tokens: TokenService) -> None:
    token = tokens.issue("app_x", ["a", "ghcr.io/o/i"], ["ghcr/o"])["token"]
    claims = tokens.verify(token)
    assert claims.subject == "app_x"
    assert claims.repositories == {"a", "ghcr.io/o/i"}
    assert claims.limits == ("ghcr/o",)


def test_anonymous_token(tokens: TokenService) -> None:
    claims = tokens.verify(tokens.issue(None, ["library/alpine"], ["dockerhub/library"])["token"])
    assert claims.subject is None and claims.limits == ("dockerhub/library",)


def test_expiry(tokens: TokenService, clock: Clock) -> None:
    token = tokens.issue("app_x", [], None)["token"]
    clock.advance(299)
    tokens.verify(token)
    clock.advance(1)
    with pytest.raises(InvalidToken, match="expired"):
        tokens.verify(token)


def test_not_yet_valid(tokens: TokenService, clock: Clock) -> None:
    token = tokens.issue("app_x", [], None)["token"]
    clock.advance(-29)
    tokens.verify(token)  # within the leeway for skewed clocks
    clock.advance(-2)
    with pytest.raises(InvalidToken, match="not yet valid"):
        tokens.verify(token)


def test_tampered_payload(tokens: TokenService) -> None:
    token = tokens.issue("app_x", ["library/alpine"], None)["token"]
    header, claims, signature = token.split(".")
    _, payload, _ = parts(token)
    payload["access"][0]["name"] = "library/secret"
    forged = f"{header}.{b64(json.dumps(payload).encode())}.{signature}"
    with pytest.raises(InvalidToken, match="Signature verification failed"):
        tokens.verify(forged)
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    with pytest.raises(InvalidToken):
        tokens.verify(f"{header}.{claims}.{flipped}")


def test_alg_none_refused(tokens: TokenService, clock: Clock) -> None:
    now = int(clock.seconds())
    claims = {
        "iss": ISSUER,
        "sub": "app_x",
        "aud": SERVICE,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "access": [{"type": "repository", "name": "library/alpine", "actions": ["pull"]}],
    }
    for header in ({"alg": "none", "typ": "JWT"}, {"alg": "None"}):
        unsigned = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}."
        with pytest.raises(InvalidToken):
            tokens.verify(unsigned)


def test_hmac_with_public_key_refused(
    tokens: TokenService, key: ec.EllipticCurvePrivateKey, clock: Clock
) -> None:
    """The algorithm-confusion attack: HS256 keyed with the (public) verification key."""
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(clock.seconds())
    claims = {"iss": ISSUER, "sub": "x", "aud": SERVICE, "iat": now, "nbf": now, "exp": now + 9}
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    with pytest.raises(InvalidToken, match="alg"):
        tokens.verify(f"{header}.{body}.{b64(signature)}")


def test_other_signer_refused(tokens: TokenService, clock: Clock) -> None:
    other = TokenService(ec.generate_private_key(ec.SECP256R1()), ISSUER, SERVICE, 300, clock)
    with pytest.raises(InvalidToken):
        tokens.verify(other.issue("app_x", ["a"], None)["token"])


def test_other_audience_or_issuer_refused(
    tokens: TokenService, key: ec.EllipticCurvePrivateKey, clock: Clock
) -> None:
    elsewhere = TokenService(key, ISSUER, "other.example.com", 300, clock)
    with pytest.raises(InvalidToken, match="Audience"):
        tokens.verify(elsewhere.issue("app_x", ["a"], None)["token"])
    impostor = TokenService(key, "https://other", SERVICE, 300, clock)
    with pytest.raises(InvalidToken, match="issuer"):
        tokens.verify(impostor.issue("app_x", ["a"], None)["token"])


def test_missing_claims_refused(
    tokens: TokenService, key: ec.EllipticCurvePrivateKey, clock: Clock
) -> None:
    now = int(clock.seconds())
    token = jwt.encode({"iss": ISSUER, "aud": SERVICE, "sub": "x", "iat": now}, key, "ES256")
    with pytest.raises(InvalidToken, match="exp"):
        tokens.verify(token)


def test_garbage_refused(tokens: TokenService) -> None:
    for garbage in ("", "abc", "a.b.c", "x" * 100_000):
        with pytest.raises(InvalidToken):
            tokens.verify(garbage)


def test_requested_repositories() -> None:
    assert requested_repositories(
        [
            "repository:library/alpine:pull",
            "repository:ghcr.io/owner/img:pull,push",
            "repository:push/only:push",
            "registry:catalog:*",
            "repository:Bad/Name:pull",
            "repository:../etc:pull",
            "repository(plugin):x:pull",
            "repository:a:pull repository:b:pull",  # the OAuth2 form: space-separated
            "repository:library/alpine:pull",
        ]
    ) == ["library/alpine", "ghcr.io/owner/img", "a", "b"]
    assert requested_repositories([]) == []
    assert len(requested_repositories([f"repository:r{i}:pull" for i in range(1000)])) == 64


def test_signing_key_made_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "token_signing_key.pem"
    key = load_signing_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    again = load_signing_key(path)
    assert key.private_numbers() == again.private_numbers()


def test_signing_key_of_wrong_kind_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="not a P-256 private key"):
        load_signing_key(path)
