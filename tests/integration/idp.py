"""A stand-in for GitHub and for an OpenID Connect issuer, on Authlib's OAuth2 server.

Run as ``python -m tests.integration.idp --port PORT``; the tests start it
with :class:`IdentityProvider`.  It serves:

- GitHub's three endpoints (an OAuth app's view of github.com):
  ``/login/oauth/authorize``, ``/login/oauth/access_token`` (which, like
  GitHub, answers token errors with 200 and an ``error`` field), and the API
  ``/api/user`` and ``/api/user/orgs``;
- an OpenID Connect issuer at ``/oidc``: discovery, ``authorize``, ``token``
  (ID tokens signed RS256) and ``jwks``.

Both use the authorization code grant with PKCE (S256) required.  The
authorize page is a form asking who signs in (and, for GitHub, in which
organisations).  ``POST /_control`` with JSON ``{"id_token": "wrong-audience"
| "wrong-signature" | "good"}`` makes later ID tokens bad in that way.
"""

from __future__ import annotations

import argparse
import html
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer, ResourceProtector
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.models import AuthorizationCodeMixin, ClientMixin, TokenMixin
from authlib.oauth2.rfc6750 import BearerTokenValidator
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oidc.core.grants import OpenIDCode
from flask import Flask, Response, jsonify, request
from joserfc.jwk import RSAKey

GITHUB_CLIENT = ("gh-client-id", "gh-client-secret")
OIDC_CLIENT = ("oidc-client-id", "oidc-client-secret")


@dataclass
class User:
    login: str
    orgs: list[str] = field(default_factory=list)


@dataclass
class Client(ClientMixin):
    client_id: str
    client_secret: str
    auth_method: str

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return ""

    def get_allowed_scope(self, scope: str) -> str:
        allowed = {"read:org", "openid", "profile", "email"}
        return " ".join(s for s in (scope or "").split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri.startswith("http://127.0.0.1:") and redirect_uri.endswith("/callback")

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(client_secret, self.client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == self.auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"


@dataclass
class Code(AuthorizationCodeMixin):
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    user: User
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None
    auth_time: int

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time

    def get_acr(self) -> str:
        return ""

    def get_amr(self) -> list[str]:
        return []


@dataclass
class Token(TokenMixin):
    access_token: str
    client_id: str
    scope: str
    user: User
    issued_at: float

    def check_client(self, client: Any) -> bool:
        return bool(client.client_id == self.client_id)

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return 3600

    def is_expired(self) -> bool:
        return time.time() > self.issued_at + 3600

    def is_revoked(self) -> bool:
        return False

    def get_user(self) -> User:
        return self.user

    def get_client(self) -> Any:
        return CLIENTS[self.client_id]


CLIENTS = {
    GITHUB_CLIENT[0]: Client(*GITHUB_CLIENT, "client_secret_post"),
    OIDC_CLIENT[0]: Client(*OIDC_CLIENT, "client_secret_basic"),
}
CODES: dict[str, Code] = {}
TOKENS: dict[str, Token] = {}
SIGNING_KEY = RSAKey.generate_key(2048, parameters={"kid": "idp-key-1", "use": "sig"})
#: Signs with the same kid as SIGNING_KEY, but is not in the JWKS.
IMPOSTOR_KEY = RSAKey.generate_key(2048, parameters={"kid": "idp-key-1", "use": "sig"})
STATE: dict[str, str] = {"id_token": "good", "issuer": ""}


class AuthorizationCodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_post", "client_secret_basic"]

    def save_authorization_code(self, code: str, req: Any) -> None:
        data = req.payload.data
        CODES[code] = Code(
            code,
            req.client.client_id,
            req.payload.redirect_uri,
            req.scope or "",
            req.user,
            data.get("code_challenge"),
            data.get("code_challenge_method"),
            data.get("nonce"),
            int(time.time()),
        )

    def query_authorization_code(self, code: str, client: Any) -> Code | None:
        item = CODES.get(code)
        return item if item and item.client_id == client.client_id else None

    def delete_authorization_code(self, authorization_code: Code) -> None:
        CODES.pop(authorization_code.code, None)

    def authenticate_user(self, authorization_code: Code) -> User:
        return authorization_code.user


class IdToken(OpenIDCode):
    def exists_nonce(self, nonce: str, req: Any) -> bool:
        return any(c.nonce == nonce for c in CODES.values())

    def resolve_client_private_key(self, client: Any) -> RSAKey:
        return IMPOSTOR_KEY if STATE["id_token"] == "wrong-signature" else SIGNING_KEY

    def get_client_algorithm(self, client: Any) -> str:
        return "RS256"

    def get_encode_header(self, client: Any) -> dict[str, str]:
        return {"alg": "RS256", "kid": "idp-key-1"}

    def get_client_claims(self, client: Any) -> dict[str, Any]:
        audience = "someone-else" if STATE["id_token"] == "wrong-audience" else client.client_id
        return {"iss": STATE["issuer"], "aud": [audience], "exp": int(time.time()) + 300}

    def generate_user_info(self, user: User, scope: str) -> dict[str, Any]:
        return {"sub": f"sub-{user.login}", "preferred_username": user.login}


class Validator(BearerTokenValidator):
    def authenticate_token(self, token_string: str) -> Token | None:
        return TOKENS.get(token_string)


def _save_token(token: dict[str, Any], req: Any) -> None:
    TOKENS[token["access_token"]] = Token(
        token["access_token"], req.client.client_id, token.get("scope", ""), req.user, time.time()
    )


def create_app(base_url: str) -> Flask:
    app = Flask(__name__)
    app.config["OAUTH2_TOKEN_EXPIRES_IN"] = {"authorization_code": 3600}
    server = AuthorizationServer(app, query_client=CLIENTS.get, save_token=_save_token)
    server.register_grant(
        AuthorizationCodeGrant, [CodeChallenge(required=True), IdToken(require_nonce=True)]
    )
    protect = ResourceProtector()
    protect.register_token_validator(Validator())
    issuer = STATE["issuer"] = f"{base_url}/oidc"

    def authorize(title: str, with_orgs: bool) -> Response | Any:
        if request.method == "GET":
            try:
                server.get_consent_grant(end_user=None)
            except OAuth2Error as e:  # an invalid request: show it, as a real provider would
                return Response(f"invalid request: {html.escape(str(e))}", status=400)
            hidden = "".join(
                f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                for k, v in request.args.items()
            )
            orgs = '<label>Organisations <input name="orgs" id="orgs"></label>' if with_orgs else ""
            return Response(
                f"<!doctype html><title>{title}</title><h1>{title}</h1>"
                f'<form method="post" action="{html.escape(request.path)}">{hidden}'
                '<label>Login <input name="login" id="login"></label>'
                f'{orgs}<button id="authorize" type="submit">Authorize</button>'
                '<button id="deny" type="submit" name="deny" value="1">Cancel</button></form>',
                content_type="text/html",
            )
        if request.form.get("deny"):
            return server.create_authorization_response(grant_user=None)
        orgs = [o.strip() for o in request.form.get("orgs", "").split(",") if o.strip()]
        return server.create_authorization_response(grant_user=User(request.form["login"], orgs))

    @app.route("/login/oauth/authorize", methods=["GET", "POST"])
    def github_authorize() -> Any:
        return authorize("Sign in to GitHub (stand-in)", with_orgs=True)

    @app.route("/login/oauth/access_token", methods=["POST"])
    def github_token() -> Any:
        if "User-Agent" not in request.headers:
            return Response("Request forbidden by administrative rules.", status=403)
        response = server.create_token_response()
        if response.status_code == 400:  # GitHub's way: errors come with 200
            response.status_code = 200
        return response

    @app.route("/api/user")
    @protect()
    def github_user() -> Any:
        from authlib.integrations.flask_oauth2 import current_token

        if "User-Agent" not in request.headers:
            return Response("Request forbidden by administrative rules.", status=403)
        user = current_token.user
        return jsonify({"login": user.login, "id": abs(hash(user.login)) % 10**8, "name": None})

    @app.route("/api/user/orgs")
    @protect()
    def github_orgs() -> Any:
        from authlib.integrations.flask_oauth2 import current_token

        if "read:org" not in current_token.scope.split():
            return jsonify([])
        return jsonify([{"login": org, "id": i} for i, org in enumerate(current_token.user.orgs)])

    @app.route("/oidc/.well-known/openid-configuration")
    def discovery() -> Any:
        return jsonify(
            {
                "issuer": issuer,
                "authorization_endpoint": f"{issuer}/authorize",
                "token_endpoint": f"{issuer}/token",
                "jwks_uri": f"{issuer}/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256"],
            }
        )

    @app.route("/oidc/authorize", methods=["GET", "POST"])
    def oidc_authorize() -> Any:
        return authorize("Sign in to the OIDC issuer (stand-in)", with_orgs=False)

    @app.route("/oidc/token", methods=["POST"])
    def oidc_token() -> Any:
        return server.create_token_response()

    @app.route("/oidc/jwks")
    def jwks() -> Any:
        return jsonify({"keys": [SIGNING_KEY.as_dict(private=False)]})

    @app.route("/_control", methods=["POST"])
    def control() -> Any:
        STATE["id_token"] = json.loads(request.data)["id_token"]
        return jsonify(STATE)

    @app.route("/_ready")
    def ready() -> Any:
        return "ok"

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = create_app(f"http://127.0.0.1:{args.port}")
    app.run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
