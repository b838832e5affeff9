"""Database aliases that exist for one test, as if they were in ``DATABASES``."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def temporary_alias(alias: str, **settings: Any) -> Iterator[dict[str, Any]]:
    """Add ``alias`` to the project's databases for a ``with`` block.

    It starts as a copy of the ``default`` alias (the test database, with
    Django's defaults filled in) updated with ``settings``. Django's
    ``connections.settings`` is the ``DATABASES`` dict itself, so everything
    that reads either (system checks, the management command) sees the alias.
    """
    from django.db import connections

    import django_pgpool

    entry = copy.deepcopy(dict(connections["default"].settings_dict))
    entry.update(settings)
    connections.settings[alias] = entry
    try:
        yield entry
    finally:
        if hasattr(connections._connections, alias):
            connections[alias].close()
            del connections[alias]
        del connections.settings[alias]
        django_pgpool.closeall(alias)


@contextmanager
def unpooled(alias: str) -> Iterator[None]:
    """Turn the pool of ``alias`` off for a ``with`` block (``OPTIONS["pool"] = False``)."""
    from django.db import connections

    options = connections.settings[alias]["OPTIONS"]
    saved = options.get("pool", True)
    options["pool"] = False
    try:
        yield
    finally:
        options["pool"] = saved
