"""Bar charts as inline SVG, drawn on the server: no script, nothing fetched.

Colours and fonts come from the portal's stylesheet through class names
(inline ``style`` attributes would need ``'unsafe-inline'`` in the CSP).
Each bar has a ``<title>``, which browsers show as a tooltip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.web.template import Tag, tags

WIDTH = 720
HEIGHT = 220
_LEFT = 96
_RIGHT = 8
_TOP = 20
_BOTTOM = 36


@dataclass(frozen=True)
class Bar:
    label: str  # under the axis, when shown
    tooltip: str  # what the bar is, e.g. "2026-11-02"
    value: int


def human_bytes(n: float) -> str:
    """``1.5 MB``, ``500 kB``: decimal units, as used for traffic."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            text = f"{n:.0f}" if unit == "B" else f"{n:.1f}".removesuffix(".0")
            return f"{text} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is at least *value*."""
    if value <= 0:
        return 1
    magnitude = 1
    while True:
        for step in (1, 2, 5):
            if step * magnitude >= value:
                return step * magnitude
        magnitude *= 10


def _svg(name: str, **attributes: str | int | float) -> Tag:
    tag = Tag(name)
    for key, value in attributes.items():
        tag.attributes[key.rstrip("_").replace("_", "-")] = (
            f"{value:.2f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
        )
    return tag


def bar_chart(
    bars: Sequence[Bar],
    describe: Callable[[int], str],
    title: str,
    label_every: int = 1,
) -> Tag:
    """An SVG bar chart of *bars*; *describe* writes a value (e.g. as bytes).

    With nothing to show, a sentence saying so.
    """
    if not any(b.value for b in bars):
        return tags.p(class_="no-data")(f"{title}: nothing yet.")
    top = _nice_ceiling(max((b.value for b in bars), default=0))
    plot_w = WIDTH - _LEFT - _RIGHT
    plot_h = HEIGHT - _TOP - _BOTTOM
    total = sum(b.value for b in bars)
    svg = _svg(
        "svg",
        xmlns="http://www.w3.org/2000/svg",
        viewBox=f"0 0 {WIDTH} {HEIGHT}",
        class_="chart",
        role="img",
        preserveAspectRatio="xMidYMid meet",
    )
    svg.attributes["aria-label"] = f"{title}: {describe(total)} in all"
    svg(_svg("title")(f"{title}: {describe(total)} in all"))
    for fraction in (0.0, 0.5, 1.0):
        y = _TOP + plot_h * (1 - fraction)
        svg(_svg("line", x1=_LEFT, x2=WIDTH - _RIGHT, y1=y, y2=y, class_="grid"))
        if (top * fraction).is_integer():  # no half requests on the axis
            svg(
                _svg("text", x=_LEFT - 8, y=y + 4, class_="axis", text_anchor="end")(
                    describe(int(top * fraction))
                )
            )
    slot = plot_w / max(len(bars), 1)
    for i, bar in enumerate(bars):
        height = plot_h * bar.value / top
        x = _LEFT + i * slot + slot * 0.15
        rect = _svg(
            "rect",
            x=x,
            y=_TOP + plot_h - height,
            width=slot * 0.7,
            height=max(height, 0.0),
            rx=2,
            class_="bar" if bar.value else "bar empty",
        )
        rect(_svg("title")(f"{bar.tooltip}: {describe(bar.value)}"))
        svg(rect)
        last = i == len(bars) - 1
        if last or (i % label_every == 0 and len(bars) - 1 - i >= label_every):
            # Every other label is "minor": narrow screens hide those.
            minor = not last and (i // label_every) % 2 == 1
            svg(
                _svg(
                    "text",
                    x=x + slot * 0.7 if last else x + slot * 0.35,
                    y=HEIGHT - 6,
                    class_="axis minor" if minor else "axis",
                    text_anchor="end" if last else "middle",
                )(bar.label)
            )
    return svg
