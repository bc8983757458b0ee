"""The portal's HTML pages, built with ``twisted.web.template`` (escaped by construction).

Every page works without JavaScript: actions are links to confirmation
pages and forms that post with the session's CSRF token.  The one script,
``portal.js``, only adds copy buttons.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from twisted.web.template import Tag, tags

from dockmirror.auth.keys import OPERATOR, KeyInfo, NewKey
from dockmirror.portal.app import Portal, Visitor
from dockmirror.portal.charts import Bar, bar_chart, human_bytes

STATIC = "/portal/static"


def _when(iso: str | None) -> Tag | str:
    if iso is None:
        return "never"
    stamp = datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return tags.time(datetime=iso, title=iso)(f"{stamp.day} {stamp:%b %Y %H:%M} UTC")


def _csrf(visitor: Visitor) -> Tag:
    return tags.input(type="hidden", name="csrf_token", value=visitor.csrf_token)


def _button_form(visitor: Visitor, action: str, label: str, css: str = "button") -> Tag:
    return tags.form(method="post", action=action, class_="inline")(
        _csrf(visitor), tags.button(type="submit", class_=css)(label)
    )


def layout(
    portal: Portal,
    title: str,
    content: Sequence[Any],
    visitor: Visitor | None = None,
    current: str = "",
) -> Tag:
    """A whole page: head, top bar (with navigation once signed in), content."""
    head = tags.head(
        tags.meta(charset="utf-8"),
        tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
        tags.meta(name="referrer", content="no-referrer"),
        tags.meta(name="csrf-token", content=visitor.csrf_token) if visitor else "",
        tags.title(f"{title} · dockmirror"),
        tags.link(rel="stylesheet", href=f"{STATIC}/portal.css"),
        tags.script(src=f"{STATIC}/portal.js", defer="defer"),
    )
    nav: list[Any] = []
    if visitor is not None:
        links = [("My keys", "/portal/", "keys")]
        if visitor.admin:
            links.append(("Operator", "/portal/admin", "admin"))
        nav = [
            tags.nav(class_="tabs")(
                [
                    tags.a(href=href, class_="current" if name == current else "")(label)
                    for label, href, name in links
                ]
            ),
            tags.div(class_="who")(
                tags.span(class_="identity", title=visitor.identity)(visitor.session.name),
                _button_form(visitor, "/portal/logout", "Sign out", "button quiet small"),
            ),
        ]
    bar = tags.header(class_="topbar")(
        tags.div(class_="wrap")(
            tags.a(href="/portal/", class_="brand")(
                tags.span(class_="logo")("◆"), "dockmirror", tags.small(portal.host)
            ),
            nav,
        )
    )
    return tags.html(lang="en")(
        head,
        tags.body(
            bar,
            Tag("main", attributes={"class": "wrap"}, children=list(content)),
            tags.footer(class_="wrap")(
                f"dockmirror · pull-through registry mirror at {portal.host}"
            ),
        ),
    )


def sign_in_page(portal: Portal) -> Tag:
    buttons = [
        tags.a(href=f"/portal/login/{p.name}", class_=f"button big provider-{p.name}")(
            f"Sign in with {p.label}"
        )
        for p in portal.providers.values()
    ]
    return layout(
        portal,
        "Sign in",
        [
            tags.section(class_="card narrow center")(
                tags.h1("Sign in"),
                tags.p(class_="lead")(
                    "Make and manage your own API keys for pulling images through ",
                    tags.strong(portal.host),
                    ", and see how much you pull.",
                ),
                tags.div(class_="stack")(buttons),
                tags.p(class_="muted small")(
                    "Signing in sets one cookie for this session and nothing else."
                ),
            )
        ],
    )


def _sentence(message: str) -> str:
    """An error's *message* as a page shows it: from a capital letter to a full stop.

    The API sends messages as they are, in lower case, as registry errors are.
    """
    text = message[:1].upper() + message[1:]
    return text if text.endswith((".", "?", "!")) else text + "."


def error_page(portal: Portal, status: int, message: str, visitor: Visitor | None) -> Tag:
    titles = {
        400: "This link is not valid",
        401: "Please sign in",
        403: "Not allowed",
        404: "Not found",
        409: "Cannot do that now",
        429: "Slow down",
        502: "The sign-in service is not answering",
        503: "Temporarily unavailable",
    }
    title = titles.get(status, "Something went wrong")
    return layout(
        portal,
        title,
        [
            tags.section(class_="card narrow")(
                tags.p(class_="status")(f"Error {status}"),
                tags.h1(title),
                tags.p(_sentence(message)),
                tags.p(tags.a(href="/portal/", class_="button")("Back to the portal")),
            )
        ],
        visitor,
    )


def _usage_chart(usage: dict[str, Any]) -> Tag:
    days = usage["days"]
    bars = [Bar(_short_day(d["date"]), d["date"], d["bytesServed"]) for d in days]
    total = sum(d["bytesServed"] for d in days)
    requests = sum(d["requests"] for d in days)
    return tags.section(class_="card")(
        tags.div(class_="card-head")(
            tags.h2(f"Traffic, last {len(days)} days"),
            tags.p(class_="muted")(f"{human_bytes(total)} in {requests:,} requests"),
        ),
        bar_chart(bars, human_bytes, "Bytes pulled per day", label_every=5),
    )


def _limits(key: KeyInfo) -> Tag | str:
    if not key.repositories:
        return tags.span(class_="muted small")("all repositories")
    return tags.span([tags.span(class_="chip")(r) for r in key.repositories])


def _key_row(visitor: Visitor, key: KeyInfo, admin: bool = False) -> Tag:
    data = key.to_json()
    actions: list[Any]
    if key.revoked:
        actions = [tags.span(class_="badge revoked")("deleted")]
    elif admin:
        actions = [
            tags.a(href=f"/portal/admin/keys/{key.app_id}/revoke", class_="button danger small")(
                "Revoke"
            )
        ]
    else:
        actions = [
            tags.a(href=f"/portal/keys/{key.app_id}/rotate", class_="button small")("Regenerate"),
            tags.a(href=f"/portal/keys/{key.app_id}/delete", class_="button danger small")(
                "Delete"
            ),
        ]
    cells = [
        tags.td(**{"data-label": "Name"})(tags.strong(key.name), tags.br(), _limits(key)),
        tags.td(**{"data-label": "App ID"})(tags.code(key.app_id)),
    ]
    cells += [
        tags.td(**{"data-label": "Created"})(_when(data["createdAt"])),
        tags.td(**{"data-label": "Last used"})(_when(data["lastUsedAt"])),
        tags.td(class_="num", **{"data-label": "Requests"})(f"{key.use_count:,}"),
        tags.td(class_="num", **{"data-label": "Traffic"})(human_bytes(key.bytes_served)),
        tags.td(class_="actions")(actions),
    ]
    return tags.tr(class_="revoked" if key.revoked else "", id=key.app_id)(cells)


def _keys_table(visitor: Visitor, keys: Sequence[KeyInfo], admin: bool = False) -> Tag:
    heads = ["Name", "App ID", "Created", "Last used"]
    return tags.table(class_="keys")(
        tags.thead(
            tags.tr(
                [tags.th(h) for h in heads],
                tags.th(class_="num")("Requests"),
                tags.th(class_="num")("Traffic"),
                tags.th(tags.span(class_="visually-hidden")("Actions")),
            )
        ),
        tags.tbody([_key_row(visitor, k, admin) for k in keys]),
    )


def _create_form(portal: Portal, visitor: Visitor, live: int) -> Tag:
    quota = portal.config.max_keys_per_user
    full = live >= quota
    form = tags.form(method="post", action="/portal/keys", class_="create")(
        _csrf(visitor),
        tags.label(for_="name")("Name"),
        tags.input(
            id="name",
            name="name",
            required="required",
            maxlength="100",
            placeholder="e.g. laptop, ci-runner",
            autocomplete="off",
        ),
        tags.label(for_="repositories")("Repositories ", tags.span(class_="muted")("(optional)")),
        tags.input(
            id="repositories",
            name="repositories",
            placeholder="e.g. dockerhub/library, ghcr/myorg",
            autocomplete="off",
        ),
        tags.p(class_="hint")(
            "Limit the key to some repositories, as UPSTREAM/PREFIX, separated by commas."
            " Leave empty to allow every repository."
        ),
        tags.button(type="submit", class_="button primary")("Create key"),
    )
    if full:
        form.attributes["class"] = "create disabled"
        form.children.insert(
            0,
            tags.p(class_="notice")(
                f"You have {live} of {quota} keys. Delete one to make another."
            ),
        )
    return tags.section(class_="card", id="create")(
        tags.div(class_="card-head")(
            tags.h2("Create a key"), tags.p(class_="muted")(f"{live} of {quota} keys in use")
        ),
        form,
    )


def keys_page(
    portal: Portal,
    visitor: Visitor,
    keys: Sequence[KeyInfo],
    usage: dict[str, Any],
    notice: str | None = None,
) -> Tag:
    live = [k for k in keys if not k.revoked]
    gone = [k for k in keys if k.revoked]
    listing: list[Any]
    if live:
        listing = [_keys_table(visitor, live)]
    else:
        listing = [
            tags.p(class_="empty")(
                "You have no keys yet. Create one below, then log in with it: ",
                tags.code(f"docker login {portal.host}"),
                ".",
            )
        ]
    if gone:
        listing.append(
            tags.details(class_="revoked-keys")(
                tags.summary(f"Deleted and replaced keys ({len(gone)})"),
                _keys_table(visitor, gone),
            )
        )
    return layout(
        portal,
        "My keys",
        [
            tags.p(class_="flash", role="status")(notice) if notice else "",
            tags.div(class_="page-head")(
                tags.h1("My API keys"),
                tags.p(class_="muted")(
                    "Log in to ",
                    tags.strong(portal.host),
                    " with an appId as the user name and its apiKey as the password.",
                ),
            ),
            tags.section(class_="card flush")(listing),
            _usage_chart(usage),
            _create_form(portal, visitor, len(live)),
        ],
        visitor,
        "keys",
    )


def _copyable(label: str, value: str, ident: str, secret: bool = False) -> Tag:
    return tags.div(class_="field")(
        tags.div(class_="field-label")(label),
        tags.div(class_="copy-row")(
            tags.code(id=ident, class_="value secret" if secret else "value")(value),
            tags.button(
                type="button", class_="button copy", hidden="hidden", **{"data-copy": ident}
            )("Copy"),
        ),
    )


def _snippet(title: str, text: str, ident: str) -> Tag:
    return tags.div(class_="snippet")(
        tags.div(class_="snippet-head")(
            tags.h3(title),
            tags.button(
                type="button", class_="button copy small", hidden="hidden", **{"data-copy": ident}
            )("Copy"),
        ),
        tags.pre(id=ident)(tags.code(text)),
    )


def new_key_page(portal: Portal, visitor: Visitor, new: NewKey, replaced: str | None) -> Tag:
    host = portal.host
    basic = base64.b64encode(f"{new.app_id}:{new.api_key}".encode()).decode()
    scheme = portal.public_url.partition("://")[0]
    containerd = (
        "# /etc/containerd/certs.d/docker.io/hosts.toml\n"
        'server = "https://registry-1.docker.io"\n\n'
        f'[host."{scheme}://{host}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        f'  [host."{scheme}://{host}".header]\n'
        f'    Authorization = ["Basic {basic}"]\n'
    )
    heading = "Your regenerated key" if replaced else "Your new key"
    intro: list[Any] = [
        tags.p(class_="warning", role="alert")(
            tags.strong("Copy the apiKey now. "),
            "It is shown only on this page and cannot be shown again: dockmirror keeps only"
            " a hash of it.",
        )
    ]
    if replaced:
        intro.append(
            tags.p(class_="muted")(
                "The old key ",
                tags.code(replaced),
                " no longer works. Update every place that used it.",
            )
        )
    return layout(
        portal,
        heading,
        [
            tags.div(class_="page-head")(tags.h1(heading, ": ", new.name)),
            tags.section(class_="card")(
                intro,
                _copyable("appId (user name)", new.app_id, "app-id"),
                _copyable("apiKey (password)", new.api_key, "api-key", secret=True),
            ),
            tags.section(class_="card")(
                tags.h2("Use it"),
                _snippet(
                    "docker / podman",
                    f"echo '{new.api_key}' |\n"
                    f"  docker login {host} --username {new.app_id} --password-stdin\n"
                    f"docker pull {host}/library/alpine:latest",
                    "snippet-docker",
                ),
                _snippet(
                    "skopeo",
                    f"skopeo login {host} --username {new.app_id} --password '{new.api_key}'\n"
                    f"skopeo inspect docker://{host}/library/alpine:latest",
                    "snippet-skopeo",
                ),
                _snippet("containerd", containerd, "snippet-containerd"),
            ),
            tags.p(tags.a(href="/portal/", class_="button primary")("I saved it: back to my keys")),
        ],
        visitor,
        "keys",
    )


def confirm_page(
    portal: Portal, visitor: Visitor, key: KeyInfo, action: str, admin: bool = False
) -> Tag:
    """Ask before revoking ("delete", "revoke") or rotating ("rotate") a key."""
    if action == "rotate":
        title = f"Regenerate “{key.name}”?"
        text = (
            "A new appId and apiKey replace this key. The old ones stop working within seconds,"
            " everywhere they are used."
        )
        label, css = "Regenerate key", "button primary"
    else:
        title = f"{'Revoke' if admin else 'Delete'} “{key.name}”?"
        text = "Clients using this key will be refused within seconds. This cannot be undone."
        label, css = ("Revoke key" if admin else "Delete key"), "button danger"
    base = "/portal/admin/keys" if admin else "/portal/keys"
    back = "/portal/admin" if admin else "/portal/"
    return layout(
        portal,
        title,
        [
            tags.section(class_="card narrow")(
                tags.h1(title),
                tags.p(
                    tags.code(key.app_id),
                    f" · {key.use_count:,} requests · ",
                    human_bytes(key.bytes_served),
                    *([f" · owner {key.owner}"] if admin else []),
                ),
                tags.p(text),
                tags.div(class_="row")(
                    _button_form(visitor, f"{base}/{key.app_id}/{action}", label, css),
                    tags.a(href=back, class_="button quiet")("Cancel"),
                ),
            )
        ],
        visitor,
        "admin" if admin else "keys",
    )


def _short_day(date: str) -> str:
    """``3 Nov`` for ``2026-11-03``."""
    day = datetime.strptime(date, "%Y-%m-%d")
    return f"{day.day} {day:%b}"


def _day(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%d %b %Y")


def confirm_disable_page(portal: Portal, visitor: Visitor, identity: str) -> Tag:
    title = f"Disable {identity}?"
    return layout(
        portal,
        title,
        [
            tags.section(class_="card narrow")(
                tags.h1(title),
                tags.p(
                    "Every key of this user is revoked, their sessions end, and they cannot"
                    " sign in again until enabled. Revoked keys stay revoked."
                ),
                tags.div(class_="row")(
                    _button_form(
                        visitor,
                        f"/portal/admin/users/{quote(identity, safe='')}/disable",
                        "Disable user",
                        "button danger",
                    ),
                    tags.a(href="/portal/admin", class_="button quiet")("Cancel"),
                ),
            )
        ],
        visitor,
        "admin",
    )


def _stat(label: str, value: str, note: str = "") -> Tag:
    return tags.div(class_="stat")(
        tags.div(class_="stat-label")(label),
        tags.div(class_="stat-value")(value),
        tags.div(class_="stat-note")(note) if note else "",
    )


def _percent(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio * 100:.0f}%"


def admin_page(
    portal: Portal,
    visitor: Visitor,
    overview: dict[str, Any],
    keys: Sequence[KeyInfo],
    users: Sequence[Any],
) -> Tag:
    cache = overview["cache"]
    quota = cache["maxSize"]
    size_note = f"of {human_bytes(quota)} ({cache['size'] / quota:.0%})" if quota else "no quota"
    meter: Any = ""
    if quota:
        meter = tags.meter(min="0", max=str(quota), value=str(cache["size"]))
    stats = tags.section(class_="stats")(
        tags.div(class_="stat")(
            tags.div(class_="stat-label")("Cache size"),
            tags.div(class_="stat-value")(human_bytes(cache["size"])),
            tags.div(class_="stat-note")(f"{cache['blobs']:,} blobs, {size_note}"),
            meter,
        ),
        _stat(
            "Hit ratio",
            _percent(cache["hitRatio"]),
            f"{cache['hits']:,} hits, {cache['misses']:,} misses",
        ),
        _stat(
            "Traffic saved",
            _percent(cache["savedRatio"]),
            f"{human_bytes(cache['bytesFromCache'])} from the cache,"
            f" {human_bytes(cache['bytesFromUpstreams'])} from upstreams",
        ),
        _stat(
            "Keys",
            f"{sum(1 for k in keys if not k.revoked):,}",
            f"{len(users):,} users signed in once",
        ),
    )
    hours = overview["requests"]
    chart = tags.section(class_="card")(
        tags.div(class_="card-head")(
            tags.h2("Requests, last 24 hours"),
            tags.p(class_="muted")(
                f"{sum(h['requests'] for h in hours):,} requests · hours in UTC"
            ),
        ),
        bar_chart(
            [
                Bar(h["hour"][11:13], h["hour"][:13].replace("T", " ") + ":00 UTC", h["requests"])
                for h in hours
            ],
            lambda n: f"{n:,}",
            "Requests per hour",
            label_every=3,
        ),
    )
    upstreams = tags.section(class_="card flush")(
        tags.h2(class_="pad")("Upstreams"),
        tags.table(class_="keys")(
            tags.thead(
                tags.tr(
                    tags.th("Name"),
                    tags.th("URL"),
                    tags.th("State"),
                    tags.th(class_="num")("Latency"),
                )
            ),
            tags.tbody(
                [
                    tags.tr(
                        tags.td(**{"data-label": "Name"})(tags.strong(u["name"])),
                        tags.td(**{"data-label": "URL"})(tags.code(u["url"])),
                        tags.td(**{"data-label": "State"})(
                            tags.span(
                                tags.span(class_="badge ok" if u["up"] else "badge bad")(
                                    "up" if u["up"] else "down"
                                ),
                                " ",
                                tags.span(class_="muted small")(u["detail"]),
                            )
                        ),
                        tags.td(class_="num", **{"data-label": "Latency"})(
                            f"{u['latencyMs']} ms" if "latencyMs" in u else "–"
                        ),
                    )
                    for u in overview["upstreams"]
                ]
            ),
        ),
    )
    by_owner: dict[str, list[KeyInfo]] = {}
    for key in keys:
        by_owner.setdefault(key.owner, []).append(key)
    names = {u.identity: u for u in users}
    people = []
    for owner in sorted(set(by_owner) | set(names)):
        owned = by_owner.get(owner, [])
        user = names.get(owner)
        live = [k for k in owned if not k.revoked]
        state = tags.span(class_="badge bad")("disabled") if user and user.disabled_at else ""
        details = tags.details(class_="user")
        if live:
            details.attributes["open"] = "open"
        base = f"/portal/admin/users/{quote(owner, safe='')}"
        if owner == OPERATOR or owner == visitor.identity:
            manage: Any = ""
        elif user is not None and user.disabled_at:
            manage = _button_form(visitor, f"{base}/enable", "Enable", "button small")
        else:
            manage = tags.a(href=f"{base}/disable", class_="button danger small")("Disable user")
        people.append(
            details(
                tags.summary(
                    tags.strong(owner),
                    " ",
                    state,
                    tags.span(class_="muted small")(
                        f" · {len(live)} live key{'' if len(live) == 1 else 's'}"
                        + (f" · last signed in {_day(user.last_seen)}" if user else "")
                    ),
                ),
                tags.div(class_="pad row")(
                    manage,
                    "" if live else tags.span(class_="muted")("No live keys."),
                )
                if manage or not live
                else "",
                _keys_table(visitor, live, admin=True) if live else "",
            )
        )
    if not people:
        people = [tags.p(class_="muted pad")("No one has signed in yet.")]
    return layout(
        portal,
        "Operator",
        [
            tags.div(class_="page-head")(
                tags.h1("Operator view"),
                tags.p(class_="muted")("Cache figures count since this process started."),
            ),
            stats,
            chart,
            upstreams,
            tags.section(class_="card flush")(
                tags.h2(class_="pad")("Users and their keys"), people
            ),
        ],
        visitor,
        "admin",
    )
