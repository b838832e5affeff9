"""Reads from the ``replica`` alias, writes to ``default``.

Enabled in the testproject by ``TESTPROJECT_REPLICA_ROUTER=1`` (see settings).
Each alias has a pool of its own in every process, so the primary and the
replica are sized (``OPTIONS["pool"]["max_size"]``) and observed
(``django_pgpool.stats()``) separately.
"""

from __future__ import annotations

from typing import Any

from django.db import connections

PRIMARY = "default"
REPLICA = "replica"


class PrimaryReplicaRouter:
    def db_for_read(self, model: type[Any], **hints: Any) -> str:
        # Inside a transaction on the primary, read from the primary: the
        # replica cannot see the transaction's own uncommitted writes (nor,
        # with real replication, writes committed a moment ago).
        if connections[PRIMARY].in_atomic_block:
            return PRIMARY
        return REPLICA

    def db_for_write(self, model: type[Any], **hints: Any) -> str:
        return PRIMARY

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        # Both aliases hold the same data.
        return True

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool:
        # The replica gets its schema through replication.
        return db == PRIMARY
