"""``python3 -m testproject <command>``: the README's commands.

- ``bench``: the benchmark against the other connection strategies
  (:mod:`benchmarks`; ``bench --help`` for its options);
- ``test``: the test suite (pytest; extra arguments are passed on);
- ``demo``: serve the testproject under concurrent requests for a few seconds
  and print requests served, server connections used and pool statistics;
- ``manage``: any Django management command of the testproject.

Each command needs some of the project's extras (``demo`` and ``manage``
none: Django and psycopg2). Run with a Python that lacks them, a command goes
on in ``.venv`` of the repository: created the first time, with the project
installed there with what the command needs, and reused afterwards for as
long as it has that. A stamp in ``.venv`` records the extras installed and a
hash of ``setup.cfg``; only a changed ``setup.cfg`` or a command that needs
more extras installs again. ``--help`` never installs anything.

PostgreSQL is found or started as :mod:`testsupport.pgserver` says, by the
commands that use it.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv"
STAMP = VENV / "testproject-installed.json"


@dataclass(frozen=True)
class Command:
    #: Extras of setup.cfg the command needs besides the package's own requirements.
    extras: tuple[str, ...]
    #: What ``--help`` prints when the command's own help needs what isn't installed.
    usage: str = ""


COMMANDS = {
    "bench": Command(extras=("bench",)),
    # The suite runs the benchmark's smoke run too.
    "test": Command(
        extras=("test", "bench"),
        usage="python3 -m testproject test [pytest arguments]: the test suite; any argument "
        "goes to pytest (its own --help once the test extras are installed).",
    ),
    "demo": Command(extras=()),
    "manage": Command(
        extras=(),
        usage="python3 -m testproject manage COMMAND [options]: a Django management command "
        "of the testproject (the list and each one's --help once Django is installed).",
    ),
}


def requirements(extras: tuple[str, ...]) -> list[str]:
    """Names of the distributions the package and ``extras`` require (from setup.cfg)."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines()
    for extra in extras:
        lines += config["options.extras_require"][extra].splitlines()
    names = (re.match(r"[A-Za-z0-9_.-]+", line.strip()) for line in lines)
    return [name.group() for name in names if name]


def missing(extras: tuple[str, ...]) -> list[str]:
    """The requirements of ``extras`` not installed in this Python."""
    absent = []
    for name in requirements(extras):
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            absent.append(name)
    return absent


def setup_cfg_hash() -> str:
    return hashlib.sha256((REPO / "setup.cfg").read_bytes()).hexdigest()


def stamp() -> dict[str, Any]:
    """What ``.venv`` was installed with: ``{"setup.cfg": hash, "extras": [...]}``."""
    try:
        found = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def venv_has(extras: tuple[str, ...]) -> bool:
    """Whether ``.venv`` exists, installed with ``extras`` from this very setup.cfg."""
    installed = stamp()
    return (
        (VENV / "bin" / "python").exists()
        and installed.get("setup.cfg") == setup_cfg_hash()
        and set(extras) <= set(installed.get("extras", ()))
    )


def continue_in_venv(extras: tuple[str, ...], argv: list[str]) -> None:
    """Run this command again in ``.venv``, first installing what it lacks there."""
    python = VENV / "bin" / "python"
    inside = Path(sys.prefix).resolve() == VENV.resolve()
    if inside and os.environ.get("TESTPROJECT_BOOTSTRAPPED"):
        raise SystemExit(
            f"{', '.join(missing(extras))} still missing in {sys.prefix}; run: "
            f"{python} -m pip install -e '{REPO}[{','.join(extras)}]'"
        )
    if not venv_has(extras):
        if not python.exists():
            print(f"[testproject] creating {VENV}", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        # What was there before is installed again too: setup.cfg may have changed it.
        wanted = sorted(set(extras) | set(stamp().get("extras", ())))
        target = f"{REPO}[{','.join(wanted)}]" if wanted else str(REPO)
        print(f"[testproject] installing {target} into {VENV}", file=sys.stderr)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-e",
                target,
            ],
            check=True,
        )
        STAMP.write_text(json.dumps({"setup.cfg": setup_cfg_hash(), "extras": wanted}) + "\n")
    os.environ["TESTPROJECT_BOOTSTRAPPED"] = "1"
    os.execv(str(python), [str(python), "-m", "testproject", *argv])


def show_help(name: str, command: Command) -> int:
    """A command's --help, with nothing installed for it."""
    if name == "bench":
        from benchmarks.runner import parser as bench_parser

        bench_parser().print_help()
    elif name == "demo":
        from testproject.demo import parser as demo_parser

        demo_parser().print_help()
    else:
        print(command.usage)
    return 0


def main(argv: list[str]) -> int:
    name = argv[0] if argv else "demo"
    rest = argv[1:]
    if name in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    command = COMMANDS.get(name)
    if command is None:
        print(f"unknown command {name!r}\n{__doc__}", file=sys.stderr)
        return 2
    os.chdir(REPO)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    lacking = missing(command.extras)
    # bench and demo print their help with nothing installed; the others run
    # theirs where they are installed, if anywhere.
    wants_help = bool({"-h", "--help"} & set(rest))
    if wants_help and (name in ("bench", "demo") or (lacking and not venv_has(command.extras))):
        return show_help(name, command)
    if lacking:
        continue_in_venv(command.extras, [name, *rest])
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    if name == "test":
        import pytest

        return int(pytest.main(rest))
    if name == "demo":
        from testproject.demo import main as demo

        return demo(rest)
    if name == "bench":
        from benchmarks.runner import main as bench

        return bench(rest)
    from django.core.management import execute_from_command_line

    from testsupport.pgserver import ensure_server

    if rest and not {"-h", "--help", "help"} & set(rest):
        ensure_server(quiet=True)
    execute_from_command_line(["python3 -m testproject manage", *rest])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
