"""The README's main job (``python3 -m testproject bench``) and the demo keep working.

Smoke runs only: they check that every strategy is served and measured and
that the outputs are written; speed is never judged here (the benchmark's
numbers are in the README, from a full run).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import REPO

pytestmark = pytest.mark.slow


def run_command(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "testproject", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


@pytest.mark.timeout(600)
def test_the_benchmark_runs_every_strategy_and_writes_its_results(tmp_path: Path) -> None:
    result = run_command("bench", "--smoke", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    strategies = {row["strategy"] for row in data["medians"]}
    assert strategies == {"default", "persistent", "pgpool", "pgpool-noreset", "native"}
    cells = {(row["workload"], row["threads"]) for row in data["medians"]}
    assert cells == {("read", 1), ("read", 8), ("transaction", 1), ("transaction", 8), ("read", 64)}
    for row in data["medians"]:
        assert row["requests_per_second"] > 0, row
        assert row["failed"] == 0, row
        if row["strategy"].startswith("pgpool"):
            pool_size = 8 if row["threads"] == 64 else 10
            assert row["peak_server_connections"] <= pool_size, row
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert "| read | 1 | pgpool |" in (tmp_path / "results.md").read_text()
    assert "against the targets:" in result.stdout
    assert data["authentication"]


@pytest.mark.timeout(120)
def test_the_demo_serves_requests_within_max_size() -> None:
    result = run_command("demo", "--seconds", "1", "--threads", "6", "--max-size", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "failed: 0" in result.stdout
    assert "server connections used (peak in pg_stat_activity)" in result.stdout
    assert "requests_num" in result.stdout
