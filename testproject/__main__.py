"""``python3 -m testproject <command>``: the README's commands.

- ``demo``: serve the testproject under concurrent requests for a few seconds
  and print requests served, server connections used and pool statistics;
- ``bench``: the benchmark against the other connection strategies;
- ``test``: the test suite (pytest; extra arguments are passed on);
- ``manage``: any Django management command of the testproject.

On a machine that lacks the dependencies, the first run creates ``.venv`` in
the repository, installs the project with its extras there and continues
inside it. PostgreSQL is found or started as :mod:`testsupport.pgserver` says.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv"
EXTRAS = "test,bench"


def _dependencies_missing() -> bool:
    from importlib.util import find_spec

    return any(find_spec(name) is None for name in ("django", "psycopg2", "pytest_django"))


def _bootstrap() -> None:
    """Create the virtualenv and install the project, then re-run this command in it."""
    python = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == VENV.resolve() or os.environ.get("TESTPROJECT_BOOTSTRAPPED"):
        raise SystemExit(
            f"the dependencies are still missing in {sys.prefix}; "
            f"run: {python} -m pip install -e '{REPO}[{EXTRAS}]'"
        )
    if not python.exists():
        print(f"[testproject] creating {VENV}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    print(f"[testproject] installing django-pgpool[{EXTRAS}] into {VENV}", file=sys.stderr)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-e",
            f"{REPO}[{EXTRAS}]",
        ],
        check=True,
    )
    os.environ["TESTPROJECT_BOOTSTRAPPED"] = "1"
    os.execv(str(python), [str(python), "-m", "testproject", *sys.argv[1:]])


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "demo"
    rest = argv[1:]
    if command in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    if _dependencies_missing():
        _bootstrap()
    os.chdir(REPO)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    if command == "test":
        import pytest

        return int(pytest.main(rest))
    if command == "demo":
        from testproject.demo import main as demo

        return demo(rest)
    if command == "bench":
        from benchmarks.runner import main as bench

        return bench(rest)
    if command == "manage":
        from django.core.management import execute_from_command_line

        execute_from_command_line(["python -m testproject manage", *rest])
        return 0
    print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
