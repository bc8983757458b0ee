"""The benchmark's figures: the machine, the Markdown table, the JSON and the chart."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any

COLD_1 = "cold fetch, 1 client (s)"
HEADS = "manifest HEAD rate, one keep-alive connection (requests/s)"
SKOPEO_DIRECT = "skopeo copy, direct from the upstream (s)"
SKOPEO_COLD = "skopeo copy through the mirror, cold (s)"
SKOPEO_WARM = "skopeo copy through the mirror, warm (s)"


#: The rows of the parallel workload, in a table of their own.
PARALLEL = "first pull of the layer"
PARALLEL_DIRECT = f"{PARALLEL}, capped link: direct from the upstream, one connection (s)"
PARALLEL_CAPPED = f"{PARALLEL}, capped link: through dockmirror, parallel_parts = 4 (s)"
PARALLEL_CAPPED_RATIO = f"{PARALLEL}, capped link: through dockmirror / direct"
PARALLEL_PARTS = f"{PARALLEL}, uncapped: through dockmirror, parallel_parts = 4 (s)"
PARALLEL_STREAM = f"{PARALLEL}, uncapped: through dockmirror, parallel_parts = 1 (s)"
PARALLEL_RATIO = f"{PARALLEL}, uncapped: 4 parts / one stream"


def hit_row(clients: int) -> str:
    return f"cache-hit throughput, {clients} client{'s' * (clients > 1)} (MiB/s)"


def hit_cpu_row(clients: int) -> str:
    return f"server CPU per GiB sent, cache hits, {clients} client{'s' * (clients > 1)} (s)"


def hit_worker_rss_row(clients: int) -> str:
    return f"peak RSS of one worker, cache hits, {clients} clients (MiB)"


def hit_rss_row(clients: int) -> str:
    return f"peak RSS, {clients} clients on the cached layer (MiB)"


COLD_1_CPU = "server CPU per GiB sent, cold fetch, 1 client (s)"


def cold_row(clients: int) -> str:
    return f"cold fetch, {clients} clients at once (s, until the last)"


def cold_cpu_row(clients: int) -> str:
    return f"server CPU per GiB sent, cold fetch, {clients} clients at once (s)"


def fetches_row(clients: int) -> str:
    return f"upstream GETs of the layer, {clients} cold clients"


def cold_rss_row(clients: int) -> str:
    return f"peak RSS, {clients} clients on one cold layer (MiB)"


class Runs:
    """Every figure measured: row -> server -> one value per repetition."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, list[float]]] = {}

    def add(self, row: str, server: str, value: float) -> None:
        self.values.setdefault(row, {}).setdefault(server, []).append(value)

    def get(self, row: str, server: str) -> list[float]:
        return self.values.get(row, {}).get(server, [])


def spread(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    f = f"{{:.{digits}f}}"
    median, low, high = statistics.median(values), min(values), max(values)
    if len(values) == 1 or low == high:
        return f.format(median)
    return f"{f.format(median)} ({f.format(low)}–{f.format(high)})"


def ratios(mine: list[float], theirs: list[float]) -> list[float]:
    """The ratio of each repetition's pair of figures."""
    return [a / b for a, b in zip(mine, theirs, strict=False) if b]


def _digits(values: list[float]) -> int:
    largest = max(values, default=0)
    return 0 if largest >= 100 else 1 if largest >= 10 else 2 if largest >= 1 else 3


def table(runs: Runs, names: list[str], settings: dict[str, Any], machine: dict[str, Any]) -> str:
    """The Markdown table: each server's median (min–max), and ratios of paired runs."""
    others = [n for n in names if n != "distribution"]
    extra = ["nginx"] if any("nginx" in v for v in runs.values.values()) else []
    pairs = [(n, "distribution") for n in others] + [(others[0], n) for n in others[1:] + extra]
    header = [*names, *extra, *(f"{a} / {b}" for a, b in pairs)]
    lines = [
        f"{settings['transport']}, a layer of {settings['layer_bytes'] / (1 << 20):.1f} MiB,"
        f" {settings['repetitions']} repetitions rotating the servers' order;"
        " median (min–max), and the median (min–max) of the ratios of each repetition's pair."
        f" {settings['seconds']:.0f} s in all.  Machine: {describe(machine)}.",
        "",
        "| figure | " + " | ".join(header) + " |",
        "|---|" + "---:|" * len(header),
    ]
    for row, by_server in runs.values.items():
        if row.startswith(PARALLEL):
            continue
        digits = _digits([v for values in by_server.values() for v in values])
        cells = [spread(runs.get(row, name), digits) for name in [*names, *extra]]
        if row == SKOPEO_DIRECT:
            direct = spread(runs.get(row, "upstream"), digits)
            cells = [f"{direct} (no mirror)"] + ["–"] * (len(cells) - 1)
        for a, b in pairs:
            paired = ratios(runs.get(row, a), runs.get(row, b))
            cells.append(spread(paired, 2))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parallel_table(runs: Runs, settings: dict[str, Any]) -> str:
    """The parallel workload's figures: median (min–max) of each, ratios of paired runs."""
    rows = [
        (row, v) for row, by in runs.values.items() if row.startswith(PARALLEL) for v in by.values()
    ]
    if not rows:
        return ""
    lines = [
        f"Parallel ranged fetch: a capped link is a relay allowing each TCP connection"
        f" {settings['cap_mib_per_connection']} MiB/s; every pull is a fresh mirror's first.",
        "",
        "| figure | median (min–max) |",
        "|---|---:|",
    ]
    for row, values in rows:
        digits = 2 if "/" in row.rpartition(":")[2] else _digits(values)
        lines.append(f"| {row[len(PARALLEL) + 2 :]} | {spread(values, digits)} |")
    return "\n".join(lines)


def describe(machine: dict[str, Any]) -> str:
    return (
        f"{machine['cores']} cores ({machine['cpu']}), Linux {machine['kernel']},"
        f" Python {machine['python']}, Twisted {machine['twisted']}, {machine['openssl']},"
        f" {machine['distribution']}, curl {machine['curl']}; load average"
        f" {machine['load_average_before']} before, {machine.get('load_average_after', '?')}"
        " after"
    )


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    from OpenSSL import SSL

    import twisted

    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "openssl": SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode(),
        "distribution": _version(["docker-registry", "--version"], r"\S+$"),
        "curl": _version(["curl", "--version"], r"curl (\S+)"),
        "load_average_before": load_average(),
    }


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _version(argv: list[str], pattern: str) -> str:
    try:
        output = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    except OSError:
        return "missing"
    match = re.search(pattern, output.splitlines()[0] if output else "")
    return match.group(match.lastindex or 0) if match else "unknown"


def write_json(path: Path, runs: Runs, settings: dict[str, Any], machine: dict[str, Any]) -> None:
    path.write_text(
        json.dumps({"machine": machine, "settings": settings, "runs": runs.values}, indent=1) + "\n"
    )


def chart(
    path: Path, runs: Runs, names: list[str], clients: list[int], settings: dict[str, Any]
) -> bool:
    """Cache-hit throughput against clients, one line per server; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name in [*names, "nginx"]:
        series = [runs.get(hit_row(n), name) for n in clients]
        if not all(series):
            continue
        medians = [statistics.median(s) for s in series]
        below = [m - min(s) for m, s in zip(medians, series, strict=True)]
        above = [max(s) - m for m, s in zip(medians, series, strict=True)]
        axes.errorbar(clients, medians, yerr=[below, above], marker="o", capsize=4, label=name)
    axes.set_xlabel("clients at once")
    axes.set_ylabel("MiB/s, all clients (median, min–max)")
    axes.set_xticks(clients)
    axes.set_ylim(bottom=0)
    axes.set_title(
        f"Cache hits over {settings['transport']},"
        f" {settings['layer_bytes'] / (1 << 20):.0f} MiB layer"
    )
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
