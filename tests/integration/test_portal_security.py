"""The portal over HTTP, as an attacker would try it: ownership, CSRF, OAuth state, ID tokens."""

from __future__ import annotations

import html
import re
import time
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import requests

from .conftest import Dockmirror, DockmirrorFactory
from .keys import admin, create_key
from .portal_support import (
    IdentityProvider,
    authorize,
    csrf,
    idp,  # noqa: F401 - fixture
    portal_mirror,
    sign_in,
    start_sign_in,
)
from .registries import Registry, wait_until


@pytest.fixture
def mirror(
    plain_registry: Registry,
    dockmirror: DockmirrorFactory,
    idp: IdentityProvider,  # noqa: F811
) -> Dockmirror:
    return portal_mirror(
        dockmirror, plain_registry, idp, admins=["github:root"], max_keys_per_user=2
    )


def api(
    session: requests.Session, mirror: Dockmirror, method: str, path: str, **kw: object
) -> requests.Response:
    """A JSON API call with the session's CSRF token."""
    headers = {"X-CSRF-Token": csrf(session, mirror)}
    return session.request(method, f"{mirror.url}/portal/api/{path}", headers=headers, **kw)  # type: ignore[arg-type]


def key_works(mirror: Dockmirror, app_id: str, api_key: str) -> bool:
    """Whether the token endpoint takes appId:apiKey."""
    answer = requests.get(
        f"{mirror.url}/docker-auth/token", params={"service": mirror.host}, auth=(app_id, api_key)
    )
    return answer.status_code == 200


def test_sign_in_with_github(mirror: Dockmirror) -> None:
    alice = sign_in(mirror, "Alice")
    answer = alice.get(f"{mirror.url}/portal/api/session").json()
    assert answer["identity"] == "github:alice" and answer["admin"] is False
    assert len(answer["csrfToken"]) >= 32
    cookie = next(c for c in alice.cookies if c.name == "dockmirror_session")
    assert cookie.has_nonstandard_attr("HttpOnly") and not cookie.secure
    page = alice.get(f"{mirror.url}/portal/")
    assert f'<meta name="csrf-token" content="{answer["csrfToken"]}"' in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "no-referrer"


def test_another_users_key_can_be_neither_seen_nor_revoked(mirror: Dockmirror) -> None:
    alice, bob = sign_in(mirror, "alice"), sign_in(mirror, "bob")
    created = api(alice, mirror, "POST", "keys", json={"name": "laptop"})
    assert created.status_code == 201, created.text
    app_id = created.json()["appId"]
    assert api(bob, mirror, "GET", "keys").json() == {"keys": []}
    assert app_id not in bob.get(f"{mirror.url}/portal/").text
    token = csrf(bob, mirror)
    for method, path in (("DELETE", f"keys/{app_id}"), ("POST", f"keys/{app_id}/rotate")):
        answer = api(bob, mirror, method, path)
        assert (answer.status_code, answer.json()) == (404, {"error": "no such key"})
    for path in (f"keys/{app_id}/delete", f"keys/{app_id}/rotate"):
        assert bob.get(f"{mirror.url}/portal/{path}").status_code == 404
        form = bob.post(f"{mirror.url}/portal/{path}", data={"csrf_token": token})
        assert form.status_code == 404 and "No such key." in form.text
    assert api(bob, mirror, "DELETE", "admin/keys/" + app_id).status_code == 403
    assert api(bob, mirror, "GET", "admin/keys").status_code == 403
    assert bob.get(f"{mirror.url}/portal/admin").status_code == 403
    assert api(bob, mirror, "DELETE", "keys/app_doesnotexist00000000").status_code == 404
    (key,) = api(alice, mirror, "GET", "keys").json()["keys"]
    assert key["appId"] == app_id and key["revoked"] is False and key["owner"] == "github:alice"
    assert key_works(mirror, app_id, created.json()["apiKey"])
    # An admin sees and revokes anyone's key.
    root = sign_in(mirror, "root")
    assert app_id in {k["appId"] for k in api(root, mirror, "GET", "admin/keys").json()["keys"]}
    assert api(root, mirror, "DELETE", f"admin/keys/{app_id}").json()["revoked"] is True
    assert not key_works(mirror, app_id, created.json()["apiKey"])


def test_state_changes_need_the_csrf_token(mirror: Dockmirror) -> None:
    alice = sign_in(mirror, "alice")
    url = f"{mirror.url}/portal/api/keys"
    for headers in ({}, {"X-CSRF-Token": "forged"}):
        answer = alice.post(url, json={"name": "x"}, headers=headers)
        assert answer.status_code == 403 and "CSRF" in answer.json()["error"]
    form = alice.post(f"{mirror.url}/portal/keys", data={"name": "x"})
    assert form.status_code == 403 and "text/html" in form.headers["content-type"]
    assert alice.post(f"{mirror.url}/portal/logout").status_code == 403
    assert alice.delete(f"{mirror.url}/portal/api/session").status_code == 403
    assert alice.get(url).json() == {"keys": []}
    ok = alice.post(url, json={"name": "x"}, headers={"X-CSRF-Token": csrf(alice, mirror)})
    assert ok.status_code == 201


def test_forged_or_reused_state_is_refused(mirror: Dockmirror) -> None:
    session, url = start_sign_in(mirror)
    callback = authorize(session, url, "mallory")
    parts = urlsplit(callback)
    query = dict(parse_qsl(parts.query))
    forged = f"{mirror.url}{parts.path}?{urlencode({**query, 'state': 'A' * 43})}"
    answer = session.get(forged, allow_redirects=False)
    assert answer.status_code == 400 and "not valid" in answer.text
    # The real callback, in another browser (no sign-in cookie): login CSRF.
    other = requests.Session()
    assert other.get(callback, allow_redirects=False).status_code == 400
    # Once used, a state is gone: the genuine browser's retry is refused too.
    assert session.get(callback, allow_redirects=False).status_code == 400
    assert session.get(f"{mirror.url}/portal/api/session").status_code == 401


def test_id_token_with_wrong_audience_or_signature_is_refused(
    mirror: Dockmirror,
    idp: IdentityProvider,  # noqa: F811
) -> None:
    for mode, message in (
        ("wrong-audience", "Audience doesn"),
        ("wrong-signature", "Signature verification failed"),
    ):
        idp.id_tokens(mode)
        session, url = start_sign_in(mirror, "oidc")
        answer = session.get(authorize(session, url, "carol"), allow_redirects=False)
        assert answer.status_code == 403, answer.text
        assert message in answer.text
        assert session.get(f"{mirror.url}/portal/api/session").status_code == 401
    idp.id_tokens("good")
    carol = sign_in(mirror, "carol", "oidc")
    assert carol.get(f"{mirror.url}/portal/api/session").json()["identity"] == "oidc:sub-carol"


def test_session_cookie_is_useless_after_sign_out(mirror: Dockmirror) -> None:
    for how in ("api", "form"):
        alice = sign_in(mirror, "alice")
        stolen = alice.cookies.get("dockmirror_session")
        assert stolen
        if how == "api":
            assert api(alice, mirror, "DELETE", "session").status_code == 200
        else:
            answer = alice.post(
                f"{mirror.url}/portal/logout",
                data={"csrf_token": csrf(alice, mirror)},
                allow_redirects=False,
            )
            assert answer.status_code == 303
        assert not alice.cookies.get("dockmirror_session")
        replay = requests.Session()
        replay.cookies.set("dockmirror_session", stolen)
        assert replay.get(f"{mirror.url}/portal/api/keys").status_code == 401
        assert "Sign in with GitHub" in replay.get(f"{mirror.url}/portal/").text


def test_max_keys_per_user_holds(mirror: Dockmirror) -> None:
    create_key(mirror, "operator's own")  # counts for nobody
    alice = sign_in(mirror, "alice")
    first = api(alice, mirror, "POST", "keys", json={"name": "one"})
    api(alice, mirror, "POST", "keys", json={"name": "two", "repositories": ["hub/library"]})
    over = api(alice, mirror, "POST", "keys", json={"name": "three"})
    assert over.status_code == 409 and "error" in over.json()
    form = alice.post(
        f"{mirror.url}/portal/keys", data={"name": "three", "csrf_token": csrf(alice, mirror)}
    )
    assert form.status_code == 409
    # Rotating keeps the count; deleting frees a place.
    assert api(alice, mirror, "POST", f"keys/{first.json()['appId']}/rotate").status_code == 200
    assert api(alice, mirror, "POST", "keys", json={"name": "three"}).status_code == 409
    live = [k for k in api(alice, mirror, "GET", "keys").json()["keys"] if not k["revoked"]]
    assert api(alice, mirror, "DELETE", f"keys/{live[0]['appId']}").status_code == 200
    assert api(alice, mirror, "POST", "keys", json={"name": "three"}).status_code == 201
    # Another user has their own quota.
    bob = sign_in(mirror, "bob")
    assert api(bob, mirror, "POST", "keys", json={"name": "b"}).status_code == 201


def test_api_key_is_in_one_response_only_and_never_logged(mirror: Dockmirror) -> None:
    alice = sign_in(mirror, "alice")
    created = api(alice, mirror, "POST", "keys", json={"name": "ci"}).json()
    api_key, app_id = created["apiKey"], created["appId"]
    assert set(created) == {"appId", "apiKey"}
    rotated = api(alice, mirror, "POST", f"keys/{app_id}/rotate").json()
    assert not key_works(mirror, app_id, api_key)
    assert key_works(mirror, rotated["appId"], rotated["apiKey"])
    session_cookie = alice.cookies.get("dockmirror_session")
    seen = [
        alice.get(f"{mirror.url}/portal/").text,
        api(alice, mirror, "GET", "keys").text,
        api(alice, mirror, "GET", "usage").text,
        requests.get(f"{mirror.url}/metrics").text,
    ]
    time.sleep(1)
    seen.append(mirror.log_text())
    for text in seen:
        for secret in (api_key, rotated["apiKey"], session_cookie, "gh-client-secret"):
            assert secret not in text
    assert re.search(rf"key {app_id} rotated by github:alice from 127\.0\.0\.1", mirror.log_text())


def test_disabled_user_loses_keys_and_sessions(mirror: Dockmirror) -> None:
    alice = sign_in(mirror, "alice")
    created = api(alice, mirror, "POST", "keys", json={"name": "laptop"}).json()
    out = admin(mirror, "users", "disable", "github:alice").stdout
    started = time.monotonic()  # the command is done: from now on, within 5 s
    assert created["appId"] in out
    wait_until(lambda: alice.get(f"{mirror.url}/portal/api/keys").status_code == 401, timeout=5)
    wait_until(lambda: not key_works(mirror, created["appId"], created["apiKey"]), timeout=5)
    assert time.monotonic() - started < 5
    session, url = start_sign_in(mirror)
    answer = session.get(authorize(session, url, "alice"), allow_redirects=False)
    assert answer.status_code == 403 and "disabled" in answer.text
    assert "github:alice" in admin(mirror, "keys", "list").stdout


def test_sign_in_is_throttled(mirror: Dockmirror) -> None:
    session = requests.Session()
    codes = [
        session.get(f"{mirror.url}/portal/login/github", allow_redirects=False).status_code
        for _ in range(11)
    ]
    assert codes[:10] == [302] * 10 and codes[10] == 429


def test_provider_refusal_is_a_403_page(mirror: Dockmirror) -> None:
    session, url = start_sign_in(mirror)
    page = session.get(url)
    fields = dict(re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', page.text))
    denied = session.post(url.split("?")[0], data={**fields, "deny": "1"}, allow_redirects=False)
    answer = session.get(denied.headers["location"], allow_redirects=False)
    assert answer.status_code == 403 and "access_denied" in answer.text
    assert "Traceback" not in answer.text


def test_orgs_and_allowed_users(
    plain_registry: Registry,
    dockmirror: DockmirrorFactory,
    idp: IdentityProvider,  # noqa: F811
) -> None:
    mirror = portal_mirror(
        dockmirror,
        plain_registry,
        idp,
        allowed_orgs=["acme"],
        allowed_users=["github:carol"],
        admins=["github:root"],
    )
    for login, orgs, allowed in (
        ("dave", "other", False),
        ("erin", "other,acme", True),
        ("carol", "", True),
        ("root", "", True),
    ):
        session, url = start_sign_in(mirror)
        answer = session.get(authorize(session, url, login, orgs), allow_redirects=False)
        assert answer.status_code == (303 if allowed else 403), (login, answer.text)


def test_provider_down_is_a_502_page(
    plain_registry: Registry,
    dockmirror: DockmirrorFactory,
    idp: IdentityProvider,  # noqa: F811
) -> None:
    mirror = portal_mirror(dockmirror, plain_registry, idp)
    session, url = start_sign_in(mirror)
    callback = authorize(session, url, "alice")
    idp.stop()
    answer = session.get(callback, allow_redirects=False)
    assert answer.status_code == 502 and "GitHub cannot be reached" in answer.text
    oidc = session.get(f"{mirror.url}/portal/login/oidc", allow_redirects=False)
    assert oidc.status_code == 502 and "Traceback" not in oidc.text


def test_key_creation_is_throttled(mirror: Dockmirror) -> None:
    alice = sign_in(mirror, "alice")
    for _ in range(10):  # creations and regenerations count alike
        created = api(alice, mirror, "POST", "keys", json={"name": "short-lived"})
        assert created.status_code == 201
        assert api(alice, mirror, "DELETE", f"keys/{created.json()['appId']}").status_code == 200
    over = api(alice, mirror, "POST", "keys", json={"name": "one too many"})
    assert over.status_code == 429 and int(over.headers["retry-after"]) > 3000
    bob = sign_in(mirror, "bob")
    assert api(bob, mirror, "POST", "keys", json={"name": "mine"}).status_code == 201


def test_an_admin_disables_and_enables_a_user(mirror: Dockmirror) -> None:
    bob, root = sign_in(mirror, "bob"), sign_in(mirror, "root")
    created = api(bob, mirror, "POST", "keys", json={"name": "laptop"}).json()
    assert api(bob, mirror, "POST", "admin/users/github:root/disable").status_code == 403
    page = root.get(f"{mirror.url}/portal/admin").text
    assert "/portal/admin/users/github%3Abob/disable" in page
    assert "/portal/admin/users/github%3Aroot/disable" not in page  # not oneself
    confirm = root.get(f"{mirror.url}/portal/admin/users/github%3Abob/disable")
    assert confirm.status_code == 200 and "Disable github:bob?" in confirm.text
    done = root.post(
        f"{mirror.url}/portal/admin/users/github%3Abob/disable",
        data={"csrf_token": csrf(root, mirror)},
        allow_redirects=False,
    )
    assert done.status_code == 303
    assert bob.get(f"{mirror.url}/portal/api/keys").status_code == 401
    assert not key_works(mirror, created["appId"], created["apiKey"])
    assert api(root, mirror, "POST", "admin/users/github:bob/enable").json()["disabled"] is False
    assert sign_in(mirror, "bob").get(f"{mirror.url}/portal/api/keys").status_code == 200
    assert "github:bob disabled by github:root from 127.0.0.1" in mirror.log_text()


def test_bad_input_gets_a_clear_error_never_a_traceback(mirror: Dockmirror) -> None:
    alice = sign_in(mirror, "alice")
    token = {"X-CSRF-Token": csrf(alice, mirror)}
    url = f"{mirror.url}/portal/api"
    for method, path, body, status in (
        ("POST", "keys", b"{not json", 400),
        ("POST", "keys", b"[]", 400),
        ("POST", "keys", b'{"name": ""}', 400),
        ("POST", "keys", b'{"name": "' + b"x" * 200 + b'"}', 400),
        ("POST", "keys", b'{"name": "x", "repositories": ["nowhere/x"]}', 400),
        ("POST", "keys", b'{"name": "x", "repositories": "hub"}', 400),
        ("GET", "usage?days=abc", None, 400),
        ("GET", "usage?days=0", None, 400),
        ("GET", "usage?days=31", None, 400),
        ("DELETE", "keys/..%2F..%2Fetc", None, 404),
        ("PUT", "keys", b"{}", 404),
        ("GET", "nothing/here", None, 404),
    ):
        answer = alice.request(method, f"{url}/{path}", data=body, headers=token)
        assert answer.status_code == status, (method, path, answer.text)
        assert set(answer.json()) == {"error"}
    for path in ("%FF", "keys/app_x/explode", "static/../../etc/passwd", "admin/%00"):
        page = alice.get(f"{mirror.url}/portal/{path}")
        assert page.status_code in (403, 404) and "Traceback" not in page.text, path
    for cookie in ("x" * 5000, "é.é", "ü"):
        answer = requests.get(
            f"{mirror.url}/portal/api/keys",
            headers={"Cookie": f"dockmirror_session={cookie}".encode()},  # type: ignore[dict-item]
        )
        assert answer.status_code == 401, cookie
    session, _ = start_sign_in(mirror)
    session.cookies.set("dockmirror_login", "ü")
    callback = session.get(f"{mirror.url}/portal/login/github/callback?state=%C3%BC&code=x")
    assert callback.status_code == 400
    assert "Traceback" not in mirror.log_text() and "Unhandled" not in mirror.log_text()


def test_github_token_error_in_a_200_is_a_refusal(mirror: Dockmirror) -> None:
    session, url = start_sign_in(mirror)
    parts = urlsplit(authorize(session, url, "alice"))
    query = dict(parse_qsl(parts.query))
    wrong_code = f"{mirror.url}{parts.path}?{urlencode({**query, 'code': 'not-the-code'})}"
    answer = session.get(wrong_code, allow_redirects=False)
    assert answer.status_code == 403
    assert "GitHub refused the sign-in: Invalid 'code' in request." in html.unescape(answer.text)
    assert session.get(f"{mirror.url}/portal/api/session").status_code == 401
