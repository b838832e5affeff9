"""What the ``pgpool`` command's actions share: which aliases pool, the server's
limits, and reading numbers and errors for messages."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import CommandError
from django.db import connections

import django_pgpool
from django_pgpool import capacity


def pooled_aliases(only: str | None) -> list[str]:
    """The django_pgpool aliases, or just ``only`` (a CommandError if it isn't one)."""
    aliases = [
        alias
        for alias in connections.settings
        if capacity.is_pgpool_engine(connections.settings[alias])
    ]
    if only is None:
        return aliases
    if only not in connections.settings:
        raise CommandError(
            f"There is no database alias {only!r} in DATABASES "
            f"(aliases: {', '.join(connections.settings)})."
        )
    if only not in aliases:
        raise CommandError(
            f"DATABASES[{only!r}] does not use django_pgpool (ENGINE is "
            f"{connections.settings[only].get('ENGINE')!r}); set ENGINE to 'django_pgpool'."
        )
    return [only]


def expected_processes() -> int:
    """``settings.PGPOOL_EXPECTED_PROCESSES``, or a CommandError saying what is wrong."""
    try:
        return capacity.expected_processes()
    except ImproperlyConfigured as exc:
        raise CommandError(str(exc)) from None


def read_limits(alias: str, timeout: float) -> capacity.ServerLimits:
    """The server's limits, read through the alias's pool (psycopg2 or Django errors)."""
    with django_pgpool.connection(alias, timeout=timeout) as conn:
        return capacity.read_server_limits(conn)


def whole_numbers(option: str, text: str) -> list[int]:
    """``"1,2,4"`` to ``[1, 2, 4]``; a CommandError naming the option for anything else."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise CommandError(
            f"{option} takes whole numbers >= 1, comma-separated (for example 1,2,4), not {text!r}."
        )
    return values


def first_line(exc: BaseException) -> str:
    """An error's first line, without a closing period (it goes inside a sentence)."""
    lines = str(exc).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(exc).__name__
