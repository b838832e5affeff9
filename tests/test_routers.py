"""django_pgpool.routers.PrimaryReplicaRouter against a primary and a streaming standby.

Reads go to the replica while it is healthy; a request reads its own writes
from the primary; a replica that lags or stops is skipped, and used again
once it is healthy. The standby is made with ``pg_basebackup -R`` and really
replicates: a replica that can't see a write yet is what makes these tests
mean something.
"""

from __future__ import annotations

import io
import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.core.signals import request_finished, request_started
from django.db import connections
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

import django_pgpool
from django_pgpool import routers
from django_pgpool.prometheus import Collector
from testproject.library.models import Author
from testsupport import eventually
from testsupport.pgserver import EmbeddedPostgres
from testsupport.replication import execute, primary_and_standby, wait_until_replayed

from .clusters import aliases, multi_host_settings

pytestmark = pytest.mark.slow

PRIMARY, REPLICA = "rt-primary", "rt-replica"


@pytest.fixture(scope="module")
def replication() -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    with primary_and_standby(secrets.token_urlsafe(12)) as servers:
        yield servers


@pytest.fixture
def routed(
    replication: tuple[EmbeddedPostgres, EmbeddedPostgres], django_db_blocker: Any
) -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    primary, standby = replication
    entries = {
        PRIMARY: multi_host_settings([primary], PRIMARY, target=None, max_size=4, timeout=2),
        REPLICA: multi_host_settings([standby], REPLICA, target=None, max_size=4, timeout=2),
    }
    with django_db_blocker.unblock(), aliases(**entries):
        with connections[PRIMARY].schema_editor() as editor:
            editor.create_model(Author)
        try:
            wait_until_replayed(primary, standby)
            with override_settings(
                DATABASE_ROUTERS=["django_pgpool.routers.PrimaryReplicaRouter"],
                PGPOOL_ROUTER={
                    "primary": PRIMARY,
                    "replicas": [REPLICA],
                    "max_lag": 1.0,
                    "check_interval": 0.2,
                    "check_timeout": 0.5,
                },
            ):
                assert eventually(lambda: routers.monitor().healthy == (REPLICA,), timeout=10)
                yield replication
        finally:
            routers.stop_monitor()
            if standby.accepting():
                execute(standby, "SELECT pg_wal_replay_resume()")
            with connections[PRIMARY].schema_editor() as editor:
                editor.delete_model(Author)
            for alias in (PRIMARY, REPLICA):
                connections[alias].close()


def write(name: str) -> Author:
    """A write in a request of its own (the request ends: later reads may use the replica)."""
    request_started.send(sender=None)
    try:
        return Author.objects.create(name=name)
    finally:
        request_finished.send(sender=None)


def read_from() -> set[str]:
    """The aliases an ORM read went to (as CaptureQueriesContext, without connecting first)."""
    wrappers = {alias: connections[alias] for alias in (PRIMARY, REPLICA)}
    for wrapper in wrappers.values():
        wrapper.queries_log.clear()
        wrapper.force_debug_cursor = True
    try:
        list(Author.objects.all()[:1])
    finally:
        for wrapper in wrappers.values():
            wrapper.force_debug_cursor = False
    return {alias for alias, wrapper in wrappers.items() if wrapper.queries_log}


def test_reads_go_to_the_replica_and_writes_to_the_primary(routed: Any) -> None:
    assert read_from() == {REPLICA}
    with CaptureQueriesContext(connections[PRIMARY]) as on_primary:
        write("Octavia E. Butler")
    assert [q["sql"].split()[0] for q in on_primary.captured_queries] == ["INSERT"]
    stats = django_pgpool.stats()[REPLICA]
    assert stats["replica_healthy"] == 1 and 0 <= stats["replica_lag_seconds"] < 1.0


def test_a_request_reads_its_own_write_even_before_the_replica_has_it(routed: Any) -> None:
    _, standby = routed
    execute(standby, "SELECT pg_wal_replay_pause()")
    request_started.send(sender=None)
    try:
        assert read_from() == {REPLICA}
        author = Author.objects.create(name="N. K. Jemisin")
        # The replica can't see it (replay is paused); the request reads it all the same.
        assert not Author.objects.using(REPLICA).filter(pk=author.pk).exists()
        assert Author.objects.get(pk=author.pk).name == "N. K. Jemisin"
        assert read_from() == {PRIMARY}
    finally:
        request_finished.send(sender=None)
        execute(standby, "SELECT pg_wal_replay_resume()")
    request_started.send(sender=None)
    assert eventually(lambda: read_from() == {REPLICA}, timeout=10)  # the next request
    request_finished.send(sender=None)


def test_a_lagging_replica_is_skipped_until_it_catches_up(routed: Any) -> None:
    _, standby = routed
    execute(standby, "SELECT pg_wal_replay_pause()")
    write("Ted Chiang")  # WAL the replica does not replay
    assert eventually(lambda: routers.monitor().healthy == (), timeout=10)
    assert read_from() == {PRIMARY}
    stats = django_pgpool.stats()[REPLICA]
    assert stats["replica_healthy"] == 0 and stats["replica_lag_seconds"] > 1.0
    exported = {
        sample.name: sample.value
        for family in Collector().collect()
        for sample in family.samples
        if sample.labels.get("alias") == REPLICA
    }
    assert exported["django_pgpool_replica_healthy"] == 0
    assert exported["django_pgpool_replica_lag_seconds"] > 1.0
    out = io.StringIO()
    with pytest.raises(CommandError, match="Reads skip 'rt-replica'"):
        call_command("pgpool", "replicas", "--json", stdout=out)
    report = json.loads(out.getvalue())["replicas"][REPLICA]
    assert report["state"] == "lagging" and report["server"] == f"127.0.0.1:{standby.port}"

    execute(standby, "SELECT pg_wal_replay_resume()")
    assert eventually(lambda: routers.monitor().healthy == (REPLICA,), timeout=10)
    assert read_from() == {REPLICA}
    out = io.StringIO()
    call_command("pgpool", "replicas", stdout=out)
    assert f"{REPLICA}: healthy" in out.getvalue()


def test_a_stopped_replica_is_skipped_and_used_again_once_it_is_back(routed: Any) -> None:
    _, standby = routed
    standby.stop()
    try:
        assert eventually(lambda: routers.monitor().healthy == (), timeout=10)
        assert routers.monitor().health[REPLICA].state == "unreachable"
        started = time.monotonic()
        assert read_from() == {PRIMARY}  # at once: no request waits for the replica
        assert time.monotonic() - started < 0.5
    finally:
        standby.start()
    assert eventually(lambda: routers.monitor().healthy == (REPLICA,), timeout=15)
    assert eventually(lambda: read_from() == {REPLICA}, timeout=5)
