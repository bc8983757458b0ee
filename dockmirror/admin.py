"""``dockmirror-admin``: manage API keys and portal users, also while the server runs;
start warm rounds.

It opens the server's key store itself: the SQLite file ``[auth] database``,
or with ``[cluster] database`` the cluster's PostgreSQL database.  A key
revoked here stops working in a running server within seconds: the server
reloads the revoked keys each time it writes its usage counters, which it
does every few seconds, so usage shown here may be that much behind too (in
a cluster, every node hears of a revocation at once).

``migrate --to postgresql://...`` copies the SQLite key store, with its usage
counters and token signing key, and the portal's users and live sessions, with
the secrets of its cookies, into a cluster database.  Only what the cluster
lacks is copied: a key, user or secret it holds already is never changed, so
migrating again is safe and copies what was added since.

Run it as the server's user: SQLite's files must stay writable for the server.
Run as root, it takes on the identity of the owner of the state directory
(the key store's directory) before it opens anything there.

Each change (a key created, revoked or rotated, a user disabled or enabled)
is an audit event, as those of the manhole and the portal: it goes to the
system log (``/dev/log``: journald, rsyslog), facility ``authpriv``, tagged
``dockmirror-admin`` and naming who ran it (``$SUDO_USER``, else the user).
Where there is no system log, it is printed on standard error.

``warm run`` asks the running server for a warm round through its control
socket (:mod:`dockmirror.control`) and prints the result when it ends.

Exit status: 0 done, 1 the operation failed (unknown or revoked key, database
error, server not running, a warm round that could not warm every image),
2 wrong usage or configuration.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pwd
import socket
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dockmirror.auth.keydb import KeyDatabase
from dockmirror.auth.keys import KeyInfo, KeyStoreError
from dockmirror.auth.queries import KeyQueries
from dockmirror.auth.secretfile import read
from dockmirror.auth.tokens import SIGNING_KEY_FILE
from dockmirror.config import (
    Config,
    ConfigError,
    check_database_url,
    check_repository_prefix,
    load,
    state_directory,
)
from dockmirror.control import CONTROL_SOCKET
from dockmirror.portal import users
from dockmirror.portal.sessions import (
    CSRF_SECRET_FILE,
    DATABASE_FILE,
    SESSION_SECRET_FILE,
    PortalDatabase,
    PortalDump,
    PortalQueries,
    PortalStoreError,
)

PROG = "dockmirror-admin"
#: Where the system log listens; audit events go there.
SYSLOG_SOCKET = "/dev/log"
#: ``authpriv.notice``: the facility of security events, as sudo's.
_SYSLOG_PRIORITY = 10 * 8 + 5


def _actor() -> str:
    """Who runs this: the user who called sudo, else the user it runs as."""
    sudo_user = "".join(c for c in os.environ.get("SUDO_USER", "") if c.isprintable())
    if sudo_user:
        return sudo_user[:64]
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


def audit(event: str, what: str, more: str = "") -> None:
    """Record *what* changed (and *more*), by whom, as the audit event *event* in the system log."""
    message = f"{what} by {_actor()} ({PROG}){more} audit={event}"
    line = f"<{_SYSLOG_PRIORITY}>{PROG}[{os.getpid()}]: {message}".encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as log:
            log.connect(SYSLOG_SOCKET)
            log.send(line)
    except OSError as e:
        print(
            f"{PROG}: no system log ({SYSLOG_SOCKET}: {e.strerror or e}): {message}",
            file=sys.stderr,
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Manage dockmirror's API keys and portal users."
    )
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="the server's TOML configuration (default: the embedded default configuration)",
    )
    groups = parser.add_subparsers(dest="group", required=True, metavar="{keys,users,warm,migrate}")
    keys = groups.add_parser("keys", help="create, list, revoke and rotate API keys")
    commands = keys.add_subparsers(dest="command", required=True, metavar="COMMAND")
    create = commands.add_parser(
        "create", help='make a key; prints {"appId": ..., "apiKey": ...} once'
    )
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument(
        "--repository",
        action="append",
        metavar="UPSTREAM/PREFIX",
        help="only allow pulls from these repositories, e.g. ghcr/myorg (repeatable)",
    )
    listing = commands.add_parser("list", help="list the keys and their usage")
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    for name, description in (
        ("revoke", "revoke a key"),
        ("rotate", "replace a key by a new one, printed as by create; the old one is revoked"),
    ):
        commands.add_parser(name, help=description).add_argument("app_id", metavar="APPID")
    warm = groups.add_parser("warm", help="warm lists ([warm] images)")
    warm_commands = warm.add_subparsers(dest="command", required=True, metavar="COMMAND")
    warm_commands.add_parser(
        "run", help="run a warm round in the running server; prints its result as JSON"
    )
    migrate = groups.add_parser(
        "migrate",
        help="copy the SQLite key store ([auth] database), usage and token signing key"
        " included, and the portal's users and sessions into a PostgreSQL cluster database;"
        " keys, users and secrets it holds already are left as they are",
    )
    migrate.add_argument(
        "--to", required=True, metavar="URL", help="the cluster database, postgresql://..."
    )
    people = groups.add_parser("users", help="list, disable and enable portal users")
    user_commands = people.add_subparsers(dest="command", required=True, metavar="COMMAND")
    user_commands.add_parser("list", help="everyone who signed in to the portal")
    for name, description in (
        ("disable", "revoke every key of a user, end their sessions and refuse their sign-ins"),
        ("enable", "let a disabled user sign in again (their keys stay revoked)"),
    ):
        user_commands.add_parser(name, help=description).add_argument(
            "identity", metavar="IDENTITY", help="PROVIDER:LOGIN, e.g. github:octocat"
        )
    return parser


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the server's control socket."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost")
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self._path))


def _warm_run(config: Config) -> int:
    """Ask the running server for a warm round; print its result."""
    path = state_directory(config) / CONTROL_SOCKET
    connection = _UnixHTTPConnection(path)
    try:
        connection.request("POST", "/warm/run")
        response = connection.getresponse()
        body = response.read()
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"{PROG}: dockmirror is not running (nothing listens on {path})", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: cannot reach dockmirror at {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    try:
        result = json.loads(body)
    except ValueError:
        result = {"error": body[:200].decode("utf-8", "replace")}
    if response.status != 200:
        print(f"{PROG}: {result.get('error', response.status)}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0 if result.get("ok") else 1


def _table(keys: Sequence[KeyInfo]) -> str:
    header = ("APP ID", "NAME", "OWNER", "CREATED", "LAST USED", "REQUESTS", "BYTES SENT", "STATE")
    rows = [header]
    for key in keys:
        data = key.to_json()
        rows.append(
            (
                key.app_id,
                key.name,
                key.owner,
                data["createdAt"],
                data["lastUsedAt"] or "never",
                str(key.use_count),
                str(key.bytes_served),
                "revoked" if key.revoked else "active",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _run_users(args: argparse.Namespace, config: Config, db: KeyQueries) -> None:
    """``users ...`` on the portal's store: the cluster's with ``[cluster] database``."""
    if config.cluster.database is not None:
        from dockmirror.cluster.portal import with_portal  # the cluster extra, checked at load

        with_portal(config.cluster.database, lambda portal: _users(args, portal, db))
        return
    portal = PortalDatabase(state_directory(config) / DATABASE_FILE)
    try:
        _users(args, portal, db)
    finally:
        portal.close()


def _users(args: argparse.Namespace, portal: PortalQueries, db: KeyQueries) -> None:
    if args.command == "list":
        for user in portal.users():
            print(json.dumps(user.to_json()))
    elif args.command == "disable":
        done = users.disable(portal, db, args.identity)
        audit(
            "user-disabled",
            f"user {done['identity']} disabled",
            f": {len(done['keysRevoked'])} keys revoked, {done['sessionsEnded']} sessions ended",
        )
        print(json.dumps(done))
    else:
        identity = users.check_identity(args.identity)
        portal.set_disabled(identity, False)
        audit("user-enabled", f"user {identity} enabled")
        print(f"{args.identity} may sign in again")


def _run(args: argparse.Namespace, config: Config, db: KeyQueries) -> None:
    if args.group == "users":
        _run_users(args, config, db)
    elif args.command == "create":
        limits = None
        if args.repository:
            limits = [check_repository_prefix(r, config.upstreams) for r in args.repository]
        new = db.create(args.name, limits)
        audit("key-created", f"key {new.app_id} created")
        print(json.dumps(new.to_json()))
        print("Keep the apiKey now: it cannot be shown again.", file=sys.stderr)
    elif args.command == "list":
        keys = db.list()
        print(json.dumps([key.to_json() for key in keys], indent=2) if args.json else _table(keys))
    elif args.command == "revoke":
        was_revoked = db.get(args.app_id).revoked
        db.revoke(args.app_id)
        if not was_revoked:
            audit("key-revoked", f"key {args.app_id} revoked")
        print(f"{args.app_id} {'was already' if was_revoked else 'is now'} revoked")
    else:
        new = db.rotate(args.app_id)
        audit("key-rotated", f"key {args.app_id} rotated", f", replaced by {new.app_id}")
        print(json.dumps(new.to_json()))
        print(f"{args.app_id} is revoked, replaced by {new.app_id}", file=sys.stderr)


def _owner(database: Path) -> os.stat_result:
    """The state directory's status, or that of its nearest existing parent."""
    directory = database.parent.absolute()
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return directory.stat()


def _act_as_owner(database: Path) -> str | None:
    """Make sure the files SQLite creates here (the database, its -wal and -shm)
    belong to the state directory's owner, typically the server's user.

    As root, become that owner; as anyone else, warn if it is someone else.
    Returns why this cannot run, or None.
    """
    owner = _owner(database)
    if owner.st_uid == os.geteuid():
        return None
    if os.geteuid() != 0:
        print(
            f"{PROG}: warning: {database.parent} belongs to uid {owner.st_uid}, not to uid"
            f" {os.geteuid()}; run this as the server's user (sudo -u ...) so that the"
            " files it creates stay writable for the server",
            file=sys.stderr,
        )
        return None
    try:
        user: pwd.struct_passwd | None = pwd.getpwuid(owner.st_uid)
    except KeyError:
        user = None
    name = user.pw_name if user is not None else f"#{owner.st_uid}"
    try:
        if user is not None:
            os.initgroups(user.pw_name, user.pw_gid)
            os.setgid(user.pw_gid)
        else:
            os.setgroups([])
            os.setgid(owner.st_gid)
        os.setuid(owner.st_uid)
    except OSError as e:
        return (
            f"cannot act as {name}, the owner of {database.parent}: {e.strerror};"
            f" run this as that user: sudo -u {name} {PROG} ..."
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    refused = _act_as_owner(Path(config.auth.database))
    if refused is not None:
        print(f"{PROG}: {refused}", file=sys.stderr)
        return 1
    if args.group == "warm":
        return _warm_run(config)
    try:
        if args.group == "migrate":
            _migrate(config, args.to)
        else:
            _with_keys(config, args.command == "create", lambda db: _run(args, config, db))
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except (KeyStoreError, PortalStoreError, sqlite3.Error) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    return 0


def _with_keys(config: Config, create: bool, f: Callable[[KeyQueries], None]) -> None:
    """``f(key store)``: the cluster's with ``[cluster] database``, else the SQLite file."""
    if config.cluster.database is not None:
        from dockmirror.cluster.keys import with_keys  # the cluster extra, checked at load

        with_keys(config.cluster.database, f)
        return
    db = KeyDatabase(config.auth.database, create=create)
    try:
        f(db)
    finally:
        db.close()


def _migrate(config: Config, url: str) -> None:
    """Copy the SQLite key store, portal users and sessions, and the secrets into *url*."""
    check_database_url("--to", url)
    # The cluster extra, just checked.
    from dockmirror.cluster.keys import SIGNING_KEY
    from dockmirror.cluster.migrate import migrate
    from dockmirror.cluster.portal import CSRF_SECRET, SESSION_SECRET

    source = KeyDatabase(config.auth.database, create=False)
    try:
        keys = source.export()
    finally:
        source.close()
    state = state_directory(config)
    portal: PortalDump = ([], [])
    if (state / DATABASE_FILE).exists():
        portal_db = PortalDatabase(state / DATABASE_FILE)
        try:
            portal = portal_db.export()
        finally:
            portal_db.close()
    offered = {}
    for name, file in (
        (SIGNING_KEY, SIGNING_KEY_FILE),
        (SESSION_SECRET, SESSION_SECRET_FILE),
        (CSRF_SECRET, CSRF_SECRET_FILE),
    ):
        try:
            offered[name] = read(state / file)
        except FileNotFoundError:
            pass
    done = migrate(url, keys, portal, offered)
    print(
        f"copied {done.keys} keys from {config.auth.database}, usage counters included;"
        f" skipped {done.keys_skipped} the cluster holds already"
    )
    print(
        f"copied {done.users} portal users and {done.sessions} portal sessions;"
        f" skipped {done.users_skipped} users the cluster holds already"
    )
    if done.secrets.get(SIGNING_KEY):
        print("the cluster signs tokens with this server's key: tokens issued stay valid")
    elif SIGNING_KEY in done.secrets:
        print(
            "the cluster already had a token signing key: tokens issued by this server"
            " are refused by the cluster, and clients log in again",
            file=sys.stderr,
        )
    if done.secrets.get(SESSION_SECRET) and done.secrets.get(CSRF_SECRET):
        print("the cluster signs portal cookies with this server's secrets: sessions stay valid")
    elif done.sessions:
        print(
            "the cluster already had its portal secrets: people signed in to this server's"
            " portal sign in again",
            file=sys.stderr,
        )


if __name__ == "__main__":
    sys.exit(main())
