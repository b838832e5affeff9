"""docs/deployment.md and docs/sizing.md state what the code and the tests do."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from django.core.management import call_command

from .aliases import unpooled
from .helpers import REPO

DOCS = REPO / "docs"


def slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", ["deployment.md", "sizing.md"])
def test_links_lead_somewhere(page: str) -> None:
    text = (DOCS / page).read_text()
    links = re.findall(r"\]\(([\w./-]*)(?:#([\w-]+))?\)", text)
    assert links
    for target, anchor in links:
        path = (DOCS / target) if target else DOCS / page
        assert path.exists(), target
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.MULTILINE)
            assert anchor in {slug(heading) for heading in headings}, (page, target, anchor)


def test_the_sizing_page_shows_what_the_sizing_command_prints() -> None:
    text = (DOCS / "sizing.md").read_text()
    command, shown = (
        text.split("$ python manage.py pgpool size ", 1)[1].split("\n```", 1)[0].split("\n", 1)
    )
    out = StringIO()
    # The page shows a project with one pooled alias; the testproject has a replica too.
    with unpooled("replica"):
        call_command("pgpool", "size", *command.split(), stdout=out)
    assert shown == out.getvalue().rstrip("\n")


def test_the_tests_and_files_the_deployment_page_names_exist() -> None:
    text = (DOCS / "deployment.md").read_text()
    files = set(re.findall(r"`((?:tests|testproject)/[\w/]+\.py)", text))
    functions = set(re.findall(r"::(\w+)`", text))
    assert len(files) >= 6 and len(functions) >= 5
    assert all((REPO / path).exists() for path in files), files
    tests = "".join(path.read_text() for path in (REPO / "tests").glob("test_*.py"))
    assert {name for name in functions if f"def {name}(" not in tests} == set()
