"""docs/ states what the code does: options, statistics, metrics, check ids, links."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from django_pgpool import checks
from django_pgpool.config import OPTIONS, PoolConfig, options_table
from django_pgpool.prometheus import (
    DISCARDS_NAME,
    HISTOGRAMS,
    METRICS,
    PROCESS_IN_USE_NAME,
)

from .helpers import REPO, run_python

DOCS = REPO / "docs"
CONFIGURATION = DOCS / "configuration.md"


def section(path: Path, title: str) -> str:
    text = path.read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def table(text: str) -> list[list[str]]:
    """Rows of the Markdown tables in ``text``, cells stripped (header and rule left out)."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or set(line) <= {"|", "-", " ", ":"}:
            continue
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return [row for row in rows if row[0] not in ("option", "name", "id", "metric", "parameter")]


def test_every_pool_option_is_documented_with_its_default_and_unit() -> None:
    rows = {row[0].strip("`"): row for row in table(section(CONFIGURATION, "Pool options"))}
    assert set(rows) == {option.name for option in OPTIONS}
    defaults = PoolConfig()
    for option in OPTIONS:
        _, default, unit, _meaning = rows[option.name]
        expected = "the alias" if option.name == "name" else f"`{getattr(defaults, option.name)!r}`"
        assert default == expected, option.name
        assert unit == (option.unit or "—"), option.name


def generated_table(path: Path) -> str:
    """The text between the option table's markers in ``path``."""
    text = path.read_text()
    start, end = "<!-- pool-options:start -->\n", "<!-- pool-options:end -->"
    assert text.count(start) == 1 and text.count(end) == 1, f"{path.name}: the markers"
    return text.split(start, 1)[1].split(end, 1)[0]


@pytest.mark.parametrize("path", [REPO / "README.md", CONFIGURATION], ids=lambda path: path.name)
def test_the_option_tables_are_the_ones_the_code_generates(path: Path) -> None:
    # To update them: python -m django_pgpool.config --markdown
    assert generated_table(path) == options_table()


def test_the_table_generator_prints_one_row_per_option_with_its_help() -> None:
    result = run_python("from django_pgpool.config import main; main(['--markdown'])")
    assert result.returncode == 0, result.stderr
    assert result.stdout == options_table()
    rows = table(options_table())
    assert [row[0] for row in rows] == [f"`{option.name}`" for option in OPTIONS]
    assert [row[3] for row in rows] == [option.help for option in OPTIONS]


def test_every_statistic_is_documented() -> None:
    from django_pgpool.pool import ConnectionPool

    pool = ConnectionPool(PoolConfig(name="docs"), {})
    try:
        names = set(pool.stats())
    finally:
        pool.close()
    documented = {row[0].strip("`") for row in table(section(CONFIGURATION, "Statistics"))}
    assert documented == names


def test_every_prometheus_metric_is_documented_with_its_statistic_and_type() -> None:
    rows = table(section(CONFIGURATION, "Prometheus metrics"))
    documented = {row[0].strip("`"): (row[1], row[2].split("`")[1], row[3]) for row in rows}
    expected = {
        (f"{spec.name}_total" if spec.counter else spec.name): (
            "counter" if spec.counter else "gauge",
            spec.stat,
            "summed" if spec.counter else f"`{spec.multiprocess_mode}`",
        )
        for spec in METRICS
    }
    for histogram in HISTOGRAMS:
        expected[histogram.name] = ("histogram", histogram.timing, "summed")
    expected[f"{DISCARDS_NAME}_total"] = ("counter", "discards", "summed")
    expected[PROCESS_IN_USE_NAME] = (
        "gauge",
        "pool_in_use",
        "`liveall`; multiprocess mode only",
    )
    assert documented == expected


def test_every_system_check_id_is_documented() -> None:
    source = Path(checks.__file__).read_text()
    emitted = set(re.findall(r'id="(django_pgpool\.[EW]\d{3})"', source))
    documented = {row[0].strip("`") for row in table(section(CONFIGURATION, "System checks"))}
    assert documented == emitted
    assert all(f"``{check_id}``" in (checks.__doc__ or "") for check_id in emitted)


def slug(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", ["configuration.md", "migrating.md", "performance.md"])
def test_links_between_the_docs_lead_somewhere(page: str) -> None:
    text = (DOCS / page).read_text()
    for target, anchor in re.findall(r"\]\(([\w./-]*)(?:#([\w-]+))?\)", text):
        path = (DOCS / target) if target else DOCS / page
        assert path.exists(), target
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.MULTILINE)
            assert anchor in {slug(heading) for heading in headings}, (page, target, anchor)
