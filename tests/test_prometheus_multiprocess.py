"""Prometheus' multiprocess mode: gunicorn with two worker processes behind one
port, ``PROMETHEUS_MULTIPROC_DIR`` set, and one scrape of ``/metrics`` (served
by either worker, through ``MultiProcessCollector``) counting what both served."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from django_pgpool.counters import BUCKETS
from testsupport.pgserver import ensure_server
from testsupport.servers import (
    Library,
    Reply,
    free_port,
    library_database,
    project_env,
    request,
    running,
    token,
)

pytestmark = pytest.mark.slow

FLUSH_INTERVAL = 0.2


@pytest.fixture(scope="module")
def library() -> Iterator[Library]:
    with library_database(ensure_server(), "pgpool_metrics", books=5) as library:
        yield library


def scrape(port: int) -> list[Sample]:
    reply = request(port, "GET", "/metrics")
    assert reply.status == 200, reply
    families = text_string_to_metric_families(reply.body.decode())
    return [sample for family in families for sample in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        sample.value
        for sample in samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("preload", [False, True], ids=["fork-then-load", "preload"])
def test_one_scrape_counts_the_requests_of_both_gunicorn_workers(
    preload: bool, library: Library, tmp_path: Path
) -> None:
    multiproc_dir = tmp_path / "prometheus"
    multiproc_dir.mkdir()
    tag = f"metrics-{token()}-"
    port = free_port()
    env = project_env(
        library.name,
        TESTPROJECT_PROMETHEUS=str(FLUSH_INTERVAL),
        TESTPROJECT_APPLICATION_NAME=tag + "{pid}",
        TESTPROJECT_POOL='{"max_size": 2, "timeout": 20}',
        PROMETHEUS_MULTIPROC_DIR=str(multiproc_dir),
    )
    if preload:
        # The master registers the metrics and queries the database (one
        # checkout, on a pool of its own) before it forks the workers, which
        # start writing for themselves.
        env["TESTPROJECT_QUERY_IN_READY"] = "1"
    args = [
        sys.executable, "-m", "gunicorn", "testproject.wsgi:application",
        "-c", "testproject/gunicorn_prometheus.py",
        "--workers", "2", "--threads", "2", "--bind", f"127.0.0.1:{port}",
        "--timeout", "30", "--graceful-timeout", "5", "--log-level", "warning",
        *(["--preload"] if preload else []),
    ]  # fmt: skip
    served: Counter[str] = Counter()
    with running(args, env=env, log_path=tmp_path / "gunicorn.log", port=port) as gunicorn:
        # New connections each time, from several clients at once, until both
        # workers have served (gunicorn's workers race to accept).
        for _ in range(20):
            for reply in _burst(port, 40):
                assert reply.status == 200, (reply, gunicorn.log())
                served[reply.json()["application_name"]] += 1
            if len(served) == 2:
                break
        assert len(served) == 2, served
        requests = sum(served.values())
        master_checkouts = 1 if preload else 0
        processes_with_pools = 3 if preload else 2

        # Each worker writes every FLUSH_INTERVAL seconds: wait for both.
        deadline = time.monotonic() + 15
        while True:
            samples = scrape(port)
            if total(samples, "django_pgpool_requests_total") == requests + master_checkouts:
                break
            assert time.monotonic() < deadline, (requests, samples)
            time.sleep(FLUSH_INTERVAL)

    # Stopped: every process wrote a last time on its way out (its counters stay
    # in the sums; its live gauges went to zero, or went with child_exit).
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(multiproc_dir))
    after_exit = [sample for family in registry.collect() for sample in family.samples]

    default = {"alias": "default"}
    requests += master_checkouts
    assert total(after_exit, "django_pgpool_requests_total", **default) == requests
    assert total(after_exit, "django_pgpool_connections", **default) == 0
    assert total(after_exit, "django_pgpool_process_connections_in_use") == 0
    assert total(samples, "django_pgpool_requests_total", **default) == requests
    errors = [s for s in samples if s.name == "django_pgpool_request_errors_total"]
    assert [s.value for s in errors] == [0]  # present from the start, at zero

    # The acquire-time histogram: one observation per request, in cumulative
    # buckets that add up, summed over both workers (no pid label).
    buckets = {
        sample.labels["le"]: sample.value
        for sample in samples
        if sample.name == "django_pgpool_acquire_seconds_bucket" and sample.labels == {
            **default, "le": sample.labels["le"]
        }
    }  # fmt: skip
    assert list(buckets) == [*(repr(bound) for bound in BUCKETS), "+Inf"]
    counts = list(buckets.values())
    assert counts == sorted(counts)
    assert buckets["+Inf"] == requests
    assert total(samples, "django_pgpool_acquire_seconds_count", **default) == requests
    # The master never gives back the connection it took in ready().
    returned = requests - master_checkouts
    assert total(samples, "django_pgpool_usage_seconds_count", **default) == returned
    assert total(samples, "django_pgpool_acquire_seconds_sum", **default) > 0

    # Gauges: connections summed over the live workers; in use per worker (pid).
    worker_pids = {name[len(tag) :] for name in served}
    per_process = {
        sample.labels["pid"]
        for sample in samples
        if sample.name == "django_pgpool_process_connections_in_use"
    }
    assert per_process >= worker_pids
    assert total(samples, "django_pgpool_connections", **default) >= processes_with_pools
    assert total(samples, "django_pgpool_max_size", **default) == processes_with_pools * 2
    assert total(samples, "django_pgpool_connections_in_use", **default) == master_checkouts


def _burst(port: int, count: int) -> list[Reply]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as executor:
        return list(executor.map(lambda _: request(port, "GET", "/db/session/"), range(count)))
