"""``python -m bench --quick`` runs end to end; its figures are never asserted on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .registries import subprocess_env

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_bench(tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            *options,
            "--json",
            str(tmp_path / "runs.json"),
            "--chart",
            str(tmp_path / "chart.png"),
        ],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_benchmark_runs_every_workload_on_both_servers(tmp_path):
    result = run_bench(tmp_path, "--quick")
    assert result.returncode == 0, result.stderr
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    for row, servers in runs.items():
        if row.startswith("first pull of the layer"):  # the parallel workload
            expected = {"upstream"} if "direct from the upstream" in row else {"dockmirror"}
        elif "direct" in row:
            expected = {"upstream"}
        else:
            expected = {"dockmirror", "distribution"}
        assert set(servers) == expected, row
    for row in (
        "cache-hit throughput, 8 clients (MiB/s)",
        "server CPU per GiB sent, cache hits, 8 clients (s)",
        "cold fetch, 1 client (s)",
        "server CPU per GiB sent, cold fetch, 1 client (s)",
        "server CPU per GiB sent, cold fetch, 4 clients at once (s)",
        "upstream GETs of the layer, 4 cold clients",
        "manifest HEAD rate, one keep-alive connection (requests/s)",
        "skopeo copy through the mirror, warm (s)",
        "peak RSS, 4 clients on one cold layer (MiB)",
    ):
        assert row in runs
    assert "| cache-hit throughput, 1 client (MiB/s) |" in result.stdout
    assert "| capped link: through dockmirror / direct |" in result.stdout
    assert "| uncapped: 4 parts / one stream |" in result.stdout


def test_the_benchmark_runs_dockmirror_with_workers(tmp_path):
    result = run_bench(tmp_path, "--quick", "--workers", "1,2", "--only", "hit")
    assert result.returncode == 0, result.stderr
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert set(runs["cache-hit throughput, 8 clients (MiB/s)"]) == {
        "dockmirror",
        "dockmirror-w2",
        "distribution",
    }
    assert set(runs["peak RSS of one worker, cache hits, 8 clients (MiB)"]) == {"dockmirror-w2"}
    assert "| dockmirror-w2 / distribution |" in result.stdout


def test_the_benchmark_runs_a_cluster_of_each(tmp_path):
    result = run_bench(tmp_path, "--quick", "--only", "cluster", "--nodes", "2")
    assert result.returncode == 0, result.stderr
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    gets = runs["cluster: upstream GETs of the layer, 24 cold clients over 2 nodes"]
    assert set(gets) == {"dockmirror", "distribution"}
    assert gets["dockmirror"] == [1]
    failed = runs["cluster: clients that did not get the whole layer, 24 cold clients over 2 nodes"]
    assert failed["dockmirror"] == [0]
    assert "cluster: median time to first byte, 24 warm clients over 2 nodes (s)" in runs
