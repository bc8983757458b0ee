"""Keys, tokens, revocations and the login throttle shared by nodes through PostgreSQL.

Three ``twistd`` nodes on one database, as behind a load balancer: they
share ``public_url`` (the first node's), so that a token from one is valid
on all.
"""

from __future__ import annotations

import json
import time
from hashlib import sha256
from pathlib import Path
from urllib.parse import urlencode

import pytest

from .conftest import Dockmirror, DockmirrorFactory, Seeder
from .keys import admin, create_key, list_keys
from .postgres import PostgresServer
from .registries import LOOPBACK, Registry, free_port, wait_until
from .test_auth import basic
from .test_manhole import Session, keypair
from .test_pull import curl, error_code

#: The bound the README gives for a revocation to reach every node.
REVOCATION_BOUND = 5.0
#: ... and for every node to log in again once PostgreSQL is back.
RECOVERY_BOUND = 15.0


def cluster(
    dockmirror: DockmirrorFactory,
    registry: Registry,
    database: str,
    nodes: int = 3,
    public_url: str | None = None,
    first: dict[str, dict[str, object]] | None = None,
    every: dict[str, dict[str, object]] | None = None,
) -> list[Dockmirror]:
    """*nodes* started nodes sharing *database*, with Docker Hub played by *registry*.

    They serve *public_url*, by default the first node's URL; *first* is
    more configuration for the first node, *every* for all of them.
    """
    upstreams = {"hub": {"plugin": "dockerhub", "url": registry.url, "default": True}}
    made: list[Dockmirror] = []
    for _ in range(nodes):
        extra: dict[str, dict[str, object]] = {**(every or {}), "cluster": {"database": database}}
        if made or public_url:
            extra["server"] = {"public_url": public_url or made[0].url}
        if not made:
            extra.update(first or {})
        made.append(dockmirror(upstreams, auth_required=True, extra=extra, start=False))
    for node in made:
        node.start()
    return made


def token(node: Dockmirror, app_id: str, api_key: str, *scopes: str) -> str:
    """A token from *node*'s token endpoint for the cluster's service (the first node)."""
    status, body = login(node, app_id, api_key, *scopes)
    assert status == 200, body
    return str(json.loads(body)["token"])


def login(node: Dockmirror, app_id: str, api_key: str, *scopes: str) -> tuple[int, bytes]:
    service = node.config["server"]["public_url"].split("://")[1]
    query = urlencode([("service", service), *(("scope", s) for s in scopes)])
    status, _, body = curl("-H", basic(app_id, api_key), f"{node.url}/docker-auth/token?{query}")
    return status, body


def bearer(value: str) -> str:
    return f"Authorization: Bearer {value}"


@pytest.fixture
def nodes(
    plain_registry: Registry, dockmirror: DockmirrorFactory, postgres: str
) -> list[Dockmirror]:
    return cluster(dockmirror, plain_registry, postgres)


def test_a_key_made_on_one_node_works_on_the_others_at_once(nodes: list[Dockmirror]) -> None:
    app_id, api_key = create_key(nodes[1], "ci")
    for node in nodes:
        assert curl("-H", basic(app_id, api_key), f"{node.url}/v2/")[0] == 200
    issued = token(nodes[2], app_id, api_key)
    for node in nodes:  # one signing key for the cluster
        assert curl("-H", bearer(issued), f"{node.url}/v2/")[0] == 200
    # Usage from every node adds up in the one database.
    wait_until(lambda: list_keys(nodes[0])[app_id]["useCount"] == 7, timeout=15, interval=0.5)


def seconds_until_refused(nodes: list[Dockmirror], tokens: list[str]) -> float:
    """Seconds until every node refuses every one of *tokens*, within the bound."""
    revoked_at = time.monotonic()
    for node in nodes:
        for issued in tokens:
            wait_until(
                lambda node=node, issued=issued: (
                    curl("-H", bearer(issued), f"{node.url}/v2/")[0] == 401
                ),
                timeout=REVOCATION_BOUND,
                interval=0.1,
            )
    return time.monotonic() - revoked_at


def test_a_revocation_reaches_every_node_within_the_bound(nodes: list[Dockmirror]) -> None:
    app_id, api_key = create_key(nodes[0])
    tokens = [token(node, app_id, api_key) for node in nodes]
    for node in nodes:
        for issued in tokens:
            assert curl("-H", bearer(issued), f"{node.url}/v2/")[0] == 200
    admin(nodes[0], "keys", "revoke", app_id)
    elapsed = seconds_until_refused(nodes, tokens)
    print(f"revocation refused by {len(nodes)} nodes after {elapsed:.2f} s")
    assert elapsed <= REVOCATION_BOUND
    for node in nodes:
        assert curl("-H", basic(app_id, api_key), f"{node.url}/v2/")[0] == 401


def test_a_revocation_by_a_node_of_the_previous_version_reaches_every_node_by_polling(
    nodes: list[Dockmirror], postgres: str
) -> None:
    """A rolling upgrade: a node of the previous version revokes in the shared table and
    sends its unsigned notification, which the nodes ignore; the poll of the revoked
    keys refuses the key on every node within the bound all the same."""
    import psycopg

    app_id, api_key = create_key(nodes[0])
    tokens = [token(node, app_id, api_key) for node in nodes]
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute(
            "UPDATE keys SET revoked_at = extract(epoch FROM now())::bigint WHERE app_id = %s",
            (app_id,),
        )
        unsigned = json.dumps(["previous-version", "revoked", [app_id]], separators=(",", ":"))
        conn.execute("SELECT pg_notify('dockmirror', %s)", (unsigned,))
    elapsed = seconds_until_refused(nodes, tokens)
    print(f"unsigned revocation refused by {len(nodes)} nodes after {elapsed:.2f} s (polling)")
    for node in nodes:
        assert curl("-H", basic(app_id, api_key), f"{node.url}/v2/")[0] == 401
        wait_until(lambda node=node: "ignored a notification" in node.log_text())


def test_the_login_throttle_counts_across_nodes(nodes: list[Dockmirror]) -> None:
    app_id, api_key = create_key(nodes[0])
    # The limit of 10 failures, made on three nodes: none sees more than 4 itself.
    for attempt in range(10):
        node = nodes[attempt % len(nodes)]
        assert curl("-H", basic(app_id, "sk_guess"), f"{node.url}/v2/")[0] == 401

    def refused_everywhere() -> bool:
        return all(
            curl("-H", basic(app_id, api_key), f"{node.url}/v2/")[0] == 429 for node in nodes
        )

    wait_until(refused_everywhere, timeout=5, interval=0.2)
    status, _, body = curl("-H", basic(app_id, api_key), f"{nodes[1].url}/v2/")
    assert status == 429 and error_code(body) == "TOOMANYREQUESTS"


def test_postgresql_stopped_mid_run(
    plain_registry: Registry,
    dockmirror: DockmirrorFactory,
    postgres: str,
    postgres_server: PostgresServer,
    seeded: Seeder,
    unique_repo: str,
) -> None:
    image = seeded(plain_registry, unique_repo, layers=(4096,))
    nodes = cluster(dockmirror, plain_registry, postgres)
    app_id, api_key = create_key(nodes[0])
    scope = f"repository:{unique_repo}:pull"
    tokens = [token(node, app_id, api_key, scope) for node in nodes]
    paths = [f"/v2/{unique_repo}/manifests/{image.digest}"] + [
        f"/v2/{unique_repo}/blobs/{blob.digest}" for blob in image.blobs
    ]

    def pull_cached(node: Dockmirror, issued: str) -> None:
        for path in paths:
            status, _, body = curl("-H", bearer(issued), f"{node.url}{path}")
            assert status == 200, body
            assert "sha256:" + sha256(body).hexdigest() == path.rsplit("/", 1)[1]

    for node, issued in zip(nodes, tokens, strict=True):
        pull_cached(node, issued)  # cached on every node
    postgres_server.stop()
    try:
        for node, issued in zip(nodes, reversed(tokens), strict=True):
            pull_cached(node, issued)  # cached content, tokens already issued: as before
            status, body = login(node, app_id, api_key)
            assert status == 503 and error_code(body) == "UNAVAILABLE", body
            status, _, body = curl("-H", basic(app_id, api_key), f"{node.url}/v2/")
            assert status == 503 and error_code(body) == "UNAVAILABLE", body
            status, _, body = curl(f"{node.url}/healthz")
            health = json.loads(body)
            assert status == 200 and health["status"] == "degraded", health
            assert "degraded" in health["checks"]["database"], health
        failed = admin(nodes[0], "keys", "list", check=False)
        assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
        # A node restarted meanwhile verifies tokens with its copy of the signing key.
        nodes[2].restart()
        pull_cached(nodes[2], tokens[0])
        assert "using the copy in" in nodes[2].log_text()
    finally:
        postgres_server.start()
    back = time.monotonic()

    def everyone_logs_in() -> bool:
        return all(login(node, app_id, api_key)[0] == 200 for node in nodes)

    wait_until(everyone_logs_in, timeout=RECOVERY_BOUND, interval=0.5)
    print(f"every node logged in again {time.monotonic() - back:.1f} s after PostgreSQL")
    fresh_id, fresh_key = create_key(nodes[2])
    for node in nodes:
        assert curl("-H", basic(fresh_id, fresh_key), f"{node.url}/v2/")[0] == 200

    def healthy() -> bool:
        status, _, body = curl(f"{nodes[1].url}/healthz")
        return status == 200 and json.loads(body)["status"] == "ok"

    wait_until(healthy, timeout=RECOVERY_BOUND, interval=0.5)
    # Revocations missed while the nodes could not listen are caught up.
    admin(nodes[1], "keys", "revoke", fresh_id)
    wait_until(
        lambda: all(
            curl("-H", basic(fresh_id, fresh_key), f"{n.url}/v2/")[0] == 401 for n in nodes
        ),
        timeout=REVOCATION_BOUND,
        interval=0.2,
    )


def test_migrate_from_sqlite(
    plain_registry: Registry, dockmirror: DockmirrorFactory, postgres: str
) -> None:
    upstreams = {"hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True}}
    single = dockmirror(upstreams, auth_required=True)
    kept_id, kept_key = create_key(single, "laptop")
    gone_id, _ = create_key(single, "old")
    rotated = json.loads(admin(single, "keys", "rotate", gone_id).stdout)
    for _ in range(3):
        assert curl("-H", basic(kept_id, kept_key), f"{single.url}/v2/")[0] == 200
    issued = token(single, kept_id, kept_key)
    single.stop()  # writes the usage counters
    before = list_keys(single)
    assert before[kept_id]["useCount"] == 4

    done = admin(single, "migrate", "--to", postgres)
    assert "copied 3 keys" in done.stdout, done
    again = admin(single, "migrate", "--to", postgres)  # safe: nothing held is changed
    assert "copied 0 keys" in again.stdout and "skipped 3" in again.stdout, again

    # Serving the same public URL, the cluster takes the tokens issued before:
    # the token signing key came along.
    [node] = cluster(dockmirror, plain_registry, postgres, nodes=1, public_url=single.url)
    assert curl("-H", bearer(issued), f"{node.url}/v2/")[0] == 200
    after = list_keys(node)
    assert after == before  # every key, its counters and its state
    assert curl("-H", basic(kept_id, kept_key), f"{node.url}/v2/")[0] == 200
    assert curl("-H", basic(rotated["appId"], rotated["apiKey"]), f"{node.url}/v2/")[0] == 200
    assert curl("-H", basic(gone_id, "sk_x"), f"{node.url}/v2/")[0] == 401


def manhole_table(directory: Path) -> tuple[int, Path, dict[str, object]]:
    """A ``[manhole]`` table on a free port: ``(port, the operator's key, table)``."""
    port = free_port()
    operator = keypair(directory, "operator")
    authorized = directory / "authorized_keys"
    authorized.write_text(Path(f"{operator}.pub").read_text())
    table = {"listen": f"tcp:{port}:interface={LOOPBACK}", "authorized_keys": str(authorized)}
    return port, operator, table


def test_the_manhole_works_on_the_cluster_database(
    plain_registry: Registry,
    dockmirror: DockmirrorFactory,
    postgres: str,
    tmp_path: Path,
) -> None:
    port, operator, manhole = manhole_table(tmp_path)
    nodes = cluster(dockmirror, plain_registry, postgres, first={"manhole": manhole})
    session = Session(port, operator)
    try:
        session.expect(">>> ")
        session.send('keys.create("from the manhole")')
        created = session.expect(
            r"Deferred #0 called back: <new key .* appId (app_\w+) apiKey (sk_\S+)>"
        )
        app_id, api_key = created.group(1), created.group(2)
        for node in nodes:
            assert curl("-H", basic(app_id, api_key), f"{node.url}/v2/")[0] == 200
        issued = token(nodes[1], app_id, api_key)
        session.send(f'keys.revoke("{app_id}")')
        session.expect(r"Deferred #1 called back: <key app_\w+ 'from the manhole' revoked")
        revoked_at = time.monotonic()
        for node in nodes[1:]:
            wait_until(
                lambda node=node: curl("-H", bearer(issued), f"{node.url}/v2/")[0] == 401,
                timeout=REVOCATION_BOUND,
                interval=0.1,
            )
        assert time.monotonic() - revoked_at <= REVOCATION_BOUND
        assert session.close() == 0
    finally:
        session.close()


def test_notifications_from_other_database_users_are_ignored(
    nodes: list[Dockmirror], postgres: str, postgres_server: PostgresServer
) -> None:
    """Any role that may connect to the database can NOTIFY: only the nodes' own count.

    A role with no privilege on dockmirror's tables sends what would revoke
    a key and lock it out with failed logins: no node believes it.
    """
    import psycopg

    app_id, api_key = create_key(nodes[0])
    forged = [
        json.dumps(["stranger", "revoked", [app_id]]),
        *[json.dumps(["stranger", "login-failed", [app_id, LOOPBACK]])] * 12,
    ]
    postgres_server.sql("CREATE ROLE stranger LOGIN")
    try:
        with psycopg.connect(
            postgres.replace("//dockmirror@", "//stranger@"), autocommit=True
        ) as conn:
            assert conn.info.user == "stranger"
            for payload in forged:
                conn.execute("SELECT pg_notify('dockmirror', %s)", (payload,))
        time.sleep(1.5)  # believed, they would act within 0.1 s (the revocation bound's figure)
        # A forged revocation would stay, forged failures for minutes: a
        # loaded machine's transient answer (a 503, a timeout) may not.
        answers: list[tuple[int, bytes]] = []

        def works(node: Dockmirror) -> bool:
            status, _, body = curl("-H", basic(app_id, api_key), f"{node.url}/v2/")
            answers.append((status, body[:300]))
            return status == 200

        for node in nodes:
            try:
                wait_until(lambda node=node: works(node), timeout=10, interval=0.5)
            except TimeoutError:
                pytest.fail(f"the key no longer works on {node.url}: {answers[-3:]}")
    finally:
        postgres_server.sql("DROP ROLE stranger")
