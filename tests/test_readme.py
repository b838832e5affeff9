"""The README: its first commands, its configuration table and its links."""

from __future__ import annotations

import re

from django_pgpool.config import OPTIONS, PoolConfig

from .helpers import REPO

README = REPO / "README.md"


def readme_options() -> dict[str, tuple[str, str]]:
    text = README.read_text()
    table = text.split("<!-- pool-options:start -->\n", 1)[1].split("<!-- pool-options:end -->")[0]
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \| (.+?) \|", table, flags=re.MULTILINE)
    return {name: (default, unit) for name, default, unit in rows}


def test_every_option_is_documented_with_its_default_and_unit() -> None:
    documented = readme_options()
    assert set(documented) == {option.name for option in OPTIONS}
    defaults = PoolConfig()
    for option in OPTIONS:
        default, unit = documented[option.name]
        if option.name == "name":
            assert default == "the alias"
            continue
        assert default == f"`{getattr(defaults, option.name)!r}`", option.name
        assert unit == (option.unit or "—"), option.name


def commands(text: str) -> list[str]:
    """The command lines of the shell blocks, in order, without their comments."""
    blocks = re.findall(r"^```sh\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    lines = (line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines())
    return [line for line in lines if line]


def test_the_first_two_commands_are_the_benchmark_and_the_tests() -> None:
    assert commands(README.read_text())[:2] == [
        "python3 -m testproject bench",
        "python3 -m testproject test",
    ]


def slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_lead_somewhere() -> None:
    text = README.read_text()
    links = re.findall(r"\]\(([\w./-]*)(?:#([\w-]+))?\)", text)
    assert len(links) >= 10
    for target, anchor in links:
        path = (REPO / target) if target else README
        assert path.exists(), target
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.MULTILINE)
            assert anchor in {slug(heading) for heading in headings}, (target, anchor)
