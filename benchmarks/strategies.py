"""The ways a Django site can get its connections, as the benchmark runs them.

A strategy is a record of settings: the testproject reads them from
``TESTPROJECT_*`` variables (see :mod:`testproject.settings`) in the process
that serves it. To compare another configuration, add one line to
:data:`STRATEGIES`, for example::

    Strategy("pgpool-transaction", "django_pgpool, released per transaction",
             pool={"release": "transaction"}),
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

#: Django's own PostgreSQL backend.
DJANGO_BACKEND = "django.db.backends.postgresql"


@dataclass(frozen=True)
class Strategy:
    name: str
    label: str
    engine: str = "django_pgpool"
    #: ``OPTIONS["pool"]``; False: no pool.
    pool: Mapping[str, Any] | Literal[False] = field(default_factory=dict)
    #: ``CONN_MAX_AGE``: a number of seconds, or "none" (persistent).
    conn_max_age: str = "0"
    #: "psycopg3" leaves django_pgpool out of INSTALLED_APPS, so that Django's
    #: backend loads psycopg 3 (Django's native pool needs it).
    driver: str = "psycopg2"
    #: Measured in the ASGI mode too (the request mode, transaction mode and
    #: Django's native pool: the comparisons that matter there).
    under_asgi: bool = True

    @property
    def pooled(self) -> bool:
        return self.pool is not False

    def settings_env(self, **pool_options: Any) -> dict[str, str]:
        """The testproject's settings for this strategy, ``pool_options`` over its pool's."""
        pool: Mapping[str, Any] | Literal[False] = (
            {**self.pool, **pool_options} if self.pool is not False else False
        )
        return {
            "TESTPROJECT_ENGINE": self.engine,
            "TESTPROJECT_POOL": json.dumps(pool),
            "TESTPROJECT_CONN_MAX_AGE": self.conn_max_age,
            "TESTPROJECT_DRIVER": self.driver,
        }


STRATEGIES = {
    strategy.name: strategy
    for strategy in (
        Strategy(
            "default",
            "Django default (new connection per request)",
            engine=DJANGO_BACKEND,
            pool=False,
            under_asgi=False,
        ),
        Strategy(
            "persistent",
            "Django persistent (CONN_MAX_AGE=None)",
            engine=DJANGO_BACKEND,
            pool=False,
            conn_max_age="none",
            # Under ASGI each request's ORM calls run in a thread of their own,
            # and every such thread keeps its connection: not a fair ceiling,
            # and it runs the server out of connections.
            under_asgi=False,
        ),
        Strategy("pgpool", "django_pgpool (defaults)"),
        Strategy(
            "pgpool-noreset", "django_pgpool, reset off", pool={"reset": False}, under_asgi=False
        ),
        Strategy(
            "pgpool-transaction",
            "django_pgpool, released per transaction",
            pool={"release": "transaction"},
        ),
        # Same sizes as django_pgpool's defaults (min_size 1, max_size 10).
        Strategy(
            "native",
            "Django's native psycopg 3 pool",
            engine=DJANGO_BACKEND,
            pool={"min_size": 1, "max_size": 10, "timeout": 30},
            driver="psycopg3",
        ),
    )
}
