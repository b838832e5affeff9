"""The README's configuration table states every option with its true default."""

from __future__ import annotations

import re

from django_pgpool.config import OPTIONS, PoolConfig

from .helpers import REPO


def readme_options() -> dict[str, tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \| (.+?) \|", section, flags=re.MULTILINE)
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
