"""The README's main job (``python3 -m testproject bench``) and the demo keep working.

Smoke runs only: they check that every strategy is served and measured and
that the outputs are written; speed is never judged here (the benchmark's
numbers are in docs/performance.md, from a full run).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import REPO


@pytest.mark.parametrize("command", ["bench", "demo", "test", "manage"])
def test_help_installs_nothing_in_a_python_without_the_dependencies(command: str) -> None:
    # -S: no site-packages, so neither Django nor any extra is importable.
    result = subprocess.run(
        [sys.executable, "-S", "-m", "testproject", command, "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "[testproject] installing" not in result.stderr
    assert "creating" not in result.stderr
    assert "usage:" in result.stdout or "python3 -m testproject" in result.stdout


def run_command(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "testproject", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_benchmark_runs_every_strategy_and_writes_its_results(tmp_path: Path) -> None:
    result = run_command("bench", "--smoke", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    measured = {(row["mode"], row["strategy"]) for row in data["medians"]}
    strategies = {
        "default",
        "persistent",
        "pgpool",
        "pgpool-noreset",
        "pgpool-transaction",
        "native",
    }
    under_asgi = {"pgpool", "pgpool-transaction", "native"}
    assert measured == {(mode, name) for mode in ("http", "inprocess") for name in strategies} | {
        ("asgi", name) for name in under_asgi
    }
    cells = {(row["mode"], row["workload"], row["threads"]) for row in data["medians"]}
    wsgi_cells = {("read", 1), ("read", 8), ("transaction", 1), ("transaction", 8), ("read", 64)}
    assert cells == {(mode, *cell) for mode in ("http", "inprocess") for cell in wsgi_cells} | {
        ("asgi", "async-read", 32),
        ("asgi", "async-executor", 32),
        ("asgi", "async-executor", 64),
    }
    for row in data["medians"]:
        assert row["requests_per_second"] > 0, row
        starved = row["mode"] == "asgi" and row["threads"] == 64
        if not starved or row["strategy"] == "pgpool-transaction":
            # (Under ASGI, a pool smaller than the executor runs dry in the
            # request mode: that cell is there to show it.)
            assert row["failed"] == 0, row
        if row["strategy"].startswith("pgpool"):
            if starved:
                pool_size = 4
            elif row["threads"] == 64:
                pool_size = 8
            else:
                # Over HTTP and ASGI the pools keep their default max_size (10);
                # in-process they are as big as the threads.
                pool_size = row["threads"] if row["mode"] == "inprocess" else 10
            assert row["peak_server_connections"] <= pool_size, row
    assert (tmp_path / "results.png").stat().st_size > 10_000
    tables = (tmp_path / "results.md").read_text()
    assert "### Over HTTP" in tables and "### In-process" in tables and "### Under ASGI" in tables
    assert "| read | 1 | pgpool |" in tables
    assert "against the targets:" in result.stdout
    assert data["authentication"]


@pytest.mark.slow
def test_the_benchmark_runs_one_mode_when_asked(tmp_path: Path) -> None:
    result = run_command(
        "bench", "--smoke", "--mode", "inprocess", "--strategies", "pgpool,persistent",
        "--no-overload", "--threads", "2", "--out", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    assert {(r["mode"], r["strategy"], r["threads"]) for r in data["medians"]} == {
        ("inprocess", "pgpool", 2),
        ("inprocess", "persistent", 2),
    }
    # min_size = max_size = threads: both connections open, no more.
    peaks = [r["peak_server_connections"] for r in data["medians"] if r["strategy"] == "pgpool"]
    assert peaks == [2, 2]  # read, transaction


def test_the_bench_extra_installs_the_server_of_every_mode() -> None:
    # The README's first command installs the "bench" extra only (the tests
    # install more), so a server missing from it would fail a new user's run
    # after the modes before it have run for many minutes.
    from benchmarks.targets import TARGETS
    from testproject.__main__ import requirements

    installed_by_bench = {name.lower() for name in requirements(("bench",))}
    for mode, target in TARGETS.items():
        module = target.server_module
        in_repo = (REPO / module.split(".")[0]).is_dir()
        assert in_repo or module in installed_by_bench, f"{mode}: {module} is not in [bench]"


def test_the_benchmark_stops_at_once_when_a_modes_server_is_missing(tmp_path: Path) -> None:
    # As in a Python where neither gunicorn nor uvicorn is installed: the
    # check runs before any server or cluster is started.
    probe = (
        "import importlib.util, sys\n"
        "from benchmarks import runner\n"
        "real, hidden = importlib.util.find_spec, ('gunicorn', 'uvicorn')\n"
        "runner.find_spec = lambda name, *a: None if name in hidden else real(name, *a)\n"
        "sys.exit(runner.main(['--smoke', '--mode', 'all', '--out', sys.argv[1]]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode != 0
    assert "gunicorn (for the http mode), uvicorn (for the asgi mode)" in result.stderr
    assert "pip install -e '.[bench]'" in result.stderr
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_demo_serves_requests_within_max_size() -> None:
    result = run_command("demo", "--seconds", "1", "--threads", "6", "--max-size", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "failed: 0" in result.stdout
    assert "server connections used (peak in pg_stat_activity)" in result.stdout
    assert "requests_num" in result.stdout
