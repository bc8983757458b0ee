"""The portal on nodes sharing one PostgreSQL database, as behind a load balancer.

No sticky sessions: a browser signed in through one node is signed in on
every node, a sign-in begun on one node may come back from the provider to
another, and disabling a user on one node ends their sessions on all.  The
nodes serve the first node's ``public_url``; they all listen on 127.0.0.1,
and a browser sends a host's cookies to every port of it, as it would to
every node behind one name.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from .browser import browser, wait_for  # noqa: F401 - fixture
from .conftest import Dockmirror, DockmirrorFactory
from .keys import admin
from .portal_support import (
    IdentityProvider,
    authorize,
    csrf,
    idp,  # noqa: F401 - fixture
    portal_mirror,
    start_sign_in,
)
from .postgres import PostgresServer
from .registries import Registry, wait_until
from .test_auth import basic
from .test_cluster_cache import start_nodes
from .test_cluster_keys import REVOCATION_BOUND, cluster, manhole_table
from .test_manhole import Session
from .test_portal_browser import create_key, key_row, sign_in
from .test_portal_security import api
from .test_pull import curl

#: The bound the README gives for the portal to answer again once PostgreSQL is back.
RECOVERY_BOUND = 15.0


def portal_cluster(
    dockmirror: DockmirrorFactory,
    registry: Registry,
    database: str,
    idp: IdentityProvider,  # noqa: F811
    nodes: int = 3,
    public_url: str | None = None,
    **more: dict[str, object],
) -> list[Dockmirror]:
    """*nodes* nodes with the portal, ``github:root`` its admin; *more* for the first node."""
    portal = idp.portal_config(admins=["github:root"])
    return cluster(
        dockmirror, registry, database, nodes, public_url, first=more, every={"portal": portal}
    )


def key_works(node: Dockmirror, app_id: str, api_key: str) -> bool:
    return curl("-H", basic(app_id, api_key), f"{node.url}/v2/")[0] == 200


def on(node: Dockmirror, url: str) -> str:
    """*url* sent to *node* instead, as a load balancer may."""
    return urlunsplit(urlsplit(url)._replace(netloc=urlsplit(node.url).netloc))


def browser_session(node: Dockmirror, login: str) -> requests.Session:
    """A session signed in through *node* (whose callback lands on the same node)."""
    session, url = start_sign_in(node)
    done = session.get(on(node, authorize(session, url, login)), allow_redirects=False)
    assert done.status_code == 303, done.text
    return session


def signed_in(session: requests.Session, node: Dockmirror) -> bool:
    answer = session.get(f"{node.url}/portal/api/session")
    assert answer.status_code in (200, 401), answer.text
    return answer.status_code == 200


@pytest.fixture
def nodes(
    plain_registry: Registry,
    dockmirror: DockmirrorFactory,
    postgres: str,
    idp: IdentityProvider,  # noqa: F811
) -> list[Dockmirror]:
    return portal_cluster(dockmirror, plain_registry, postgres, idp)


def test_signed_in_through_one_node_in_a_browser_using_the_others(
    browser: WebDriver,  # noqa: F811
    nodes: list[Dockmirror],
) -> None:
    a, b, c = nodes
    sign_in(browser, a, "alice")
    # Node B knows the session, and takes its forms (the CSRF token is the cluster's).
    browser.get(f"{b.url}/portal/")
    wait_for(browser, "main h1", "My API keys")
    app_id, api_key = create_key(browser, "laptop")
    # Used on node C; the usage shows on node B.
    for _ in range(3):
        assert curl("-H", basic(app_id, api_key), f"{c.url}/v2/")[0] == 200

    def counted() -> bool:
        browser.get(f"{b.url}/portal/")
        try:
            return key_row(browser, app_id).get("Requests") == "3"
        except StaleElementReferenceException:
            return False

    wait_until(counted, timeout=15, interval=1)  # nodes write usage every 4 s
    # Signed out on node C: signed out everywhere.
    browser.get(f"{c.url}/portal/")
    browser.find_element(By.XPATH, "//button[text()='Sign out']").click()
    wait_for(browser, ".stack")
    for node in nodes:
        browser.get(f"{node.url}/portal/api/keys")
        assert '"sign in first"' in browser.page_source


def test_the_provider_sends_the_browser_back_to_another_node(nodes: list[Dockmirror]) -> None:
    a, b, c = nodes
    session, url = start_sign_in(a)
    state = session.cookies["dockmirror_login"]
    callback = authorize(session, url, "alice")
    # Forged: a state never begun, with a cookie to match, on node B.
    forged = on(b, callback).replace(f"state={state}", "state=" + "A" * 43)
    refused = requests.get(forged, cookies={"dockmirror_login": "A" * 43})
    assert refused.status_code == 400 and "not valid" in refused.text
    # Without the browser's sign-in cookie (login CSRF): refused by node C.
    assert requests.get(on(c, callback), allow_redirects=False).status_code == 400
    done = session.get(on(b, callback), allow_redirects=False)
    assert done.status_code == 303, done.text
    for node in nodes:
        assert signed_in(session, node)
    # Replayed on another node, with the sign-in cookie: the state was taken once.
    replay = requests.get(on(c, callback), cookies={"dockmirror_login": state})
    assert replay.status_code == 400 and "not valid" in replay.text
    # A CSRF token from node A is good on node C.
    token = csrf(session, a)
    made = session.post(
        f"{c.url}/portal/api/keys", json={"name": "ci"}, headers={"X-CSRF-Token": token}
    )
    assert made.status_code == 201, made.text
    listed = api(session, b, "GET", "keys").json()["keys"]
    assert [k["appId"] for k in listed] == [made.json()["appId"]]
    bad = session.post(
        f"{c.url}/portal/api/keys", json={"name": "x"}, headers={"X-CSRF-Token": "forged"}
    )
    assert bad.status_code == 403


def test_sign_in_attempts_are_counted_across_nodes(nodes: list[Dockmirror]) -> None:
    def attempt(node: Dockmirror) -> int:
        url = f"{node.url}/portal/login/github"
        return requests.get(url, allow_redirects=False).status_code

    # The limit of 10 a minute, spread over three nodes: none sees more than 4 itself.
    assert [attempt(nodes[i % len(nodes)]) for i in range(10)] == [302] * 10
    wait_until(lambda: all(attempt(node) == 429 for node in nodes), timeout=5, interval=0.2)


def test_a_user_disabled_on_one_node_is_signed_out_on_every_node(
    plain_registry: Registry,
    dockmirror: DockmirrorFactory,
    postgres: str,
    idp: IdentityProvider,  # noqa: F811
    tmp_path: Path,
) -> None:
    port, operator, manhole = manhole_table(tmp_path)
    nodes = portal_cluster(dockmirror, plain_registry, postgres, idp, manhole=manhole)
    a, b, c = nodes
    alice, alice_too = browser_session(a, "alice"), browser_session(c, "alice")
    key = api(alice, b, "POST", "keys", json={"name": "laptop"}).json()
    bob = browser_session(b, "bob")
    for session in (alice, alice_too, bob):
        assert all(signed_in(session, node) for node in nodes)

    out = json.loads(admin(b, "users", "disable", "github:alice").stdout)
    disabled_at = time.monotonic()
    for node in nodes:
        for session in (alice, alice_too):
            wait_until(lambda s=session, n=node: not signed_in(s, n), timeout=REVOCATION_BOUND)
        wait_until(
            lambda n=node: not key_works(n, key["appId"], key["apiKey"]),
            timeout=REVOCATION_BOUND,
        )
    elapsed = time.monotonic() - disabled_at
    print(f"sessions and keys ended on {len(nodes)} nodes after {elapsed:.2f} s")
    assert elapsed <= REVOCATION_BOUND
    assert out["sessionsEnded"] == 2 and out["keysRevoked"] == [key["appId"]]
    assert all(signed_in(bob, node) for node in nodes)
    # Disabled for every node: signing in again through another is refused.
    session, url = start_sign_in(c)
    refused = session.get(on(c, authorize(session, url, "alice")), allow_redirects=False)
    assert refused.status_code == 403 and "disabled" in refused.text
    listed = [json.loads(line) for line in admin(c, "users", "list").stdout.splitlines()]
    assert {u["identity"]: u["disabled"] for u in listed} == {
        "github:alice": True,
        "github:bob": False,
    }

    # The manhole of node A disables bob, signed in through node B.
    console = Session(port, operator)
    try:
        console.expect(">>> ")
        console.send('users.disable("github:bob")')
        console.expect(r"Deferred #0 called back: .*'sessionsEnded': 1")
        wait_until(
            lambda: not any(signed_in(bob, node) for node in nodes), timeout=REVOCATION_BOUND
        )
        assert console.close() == 0
    finally:
        console.close()


def test_postgresql_stopped_mid_run(
    nodes: list[Dockmirror], postgres_server: PostgresServer
) -> None:
    a, b, c = nodes
    alice = browser_session(a, "alice")
    made = api(alice, b, "POST", "keys", json={"name": "laptop"})
    assert made.status_code == 201
    postgres_server.stop()
    try:
        for node in nodes:
            page = alice.get(f"{node.url}/portal/")
            assert page.status_code == 503, page.text
            assert page.headers["content-type"] == "text/html; charset=utf-8"
            assert "Content-Security-Policy" in page.headers
            assert "unavailable" in page.text and "Traceback" not in page.text
            assert page.headers["retry-after"] == "5"
            answer = alice.get(f"{node.url}/portal/api/keys")
            assert answer.status_code == 503 and "unavailable" in answer.json()["error"]
            start = requests.get(f"{node.url}/portal/login/github", allow_redirects=False)
            assert start.status_code == 503 and "unavailable" in start.text
            # Signed out, the sign-in page needs no database.
            assert requests.get(f"{node.url}/portal/").status_code == 200
        down = " ".join(node.log_text() for node in nodes)
        assert "Traceback" not in down
    finally:
        postgres_server.start()
    back = time.monotonic()
    wait_until(
        lambda: all(alice.get(f"{node.url}/portal/api/keys").status_code == 200 for node in nodes),
        timeout=RECOVERY_BOUND,
        interval=0.5,
    )
    print(f"every node's portal answered {time.monotonic() - back:.1f} s after PostgreSQL")
    assert signed_in(browser_session(c, "bob"), a)


def test_a_node_queries_postgresql_through_one_pool(
    plain_registry: Registry,
    dockmirror: DockmirrorFactory,
    postgres: str,
    postgres_server: PostgresServer,
    idp: IdentityProvider,  # noqa: F811
) -> None:
    [node] = start_nodes(
        dockmirror, plain_registry, postgres, count=1, every={"portal": idp.portal_config()}
    )
    alice = browser_session(node, "alice")
    key = api(alice, node, "POST", "keys", json={"name": "laptop"}).json()
    assert key_works(node, key["appId"], key["apiKey"])
    rows = postgres_server.sql(
        "SELECT application_name, count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid() GROUP BY 1",
        database=urlsplit(postgres).path.lstrip("/"),
    )
    connections = dict(line.split("|") for line in rows.splitlines())
    # The pool (keys, portal, cache index), the listening connection, the fill claims.
    assert set(connections) == {"dockmirror", "dockmirror-listen", "dockmirror-fills"}, rows
    assert int(connections["dockmirror"]) <= 8


def test_migrate_copies_users_and_sessions(
    plain_registry: Registry,
    dockmirror: DockmirrorFactory,
    postgres: str,
    idp: IdentityProvider,  # noqa: F811
) -> None:
    single = portal_mirror(dockmirror, plain_registry, idp)
    alice = browser_session(single, "alice")
    key = api(alice, single, "POST", "keys", json={"name": "laptop"}).json()
    browser_session(single, "bob")
    admin(single, "users", "disable", "github:bob")
    single.stop()

    done = admin(single, "migrate", "--to", postgres)

    nodes = portal_cluster(dockmirror, plain_registry, postgres, idp, 2, single.url)
    for node in nodes:  # the same browser, still signed in, on every node
        (listed,) = api(alice, node, "GET", "keys").json()["keys"]
        assert listed["appId"] == key["appId"]
        assert key_works(node, key["appId"], key["apiKey"])
    listed = [json.loads(line) for line in admin(nodes[1], "users", "list").stdout.splitlines()]
    assert {u["identity"]: u["disabled"] for u in listed} == {
        "github:alice": False,
        "github:bob": True,
    }
    assert "copied 1 keys" in done.stdout, done
    assert "copied 2 portal users and 1 portal sessions" in done.stdout, done
    assert "sessions stay valid" in done.stdout, done
