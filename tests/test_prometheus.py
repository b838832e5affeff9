"""The Prometheus collector, read from the real exposition text a scrape returns."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection, connections
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import django_pgpool
import django_pgpool.prometheus
from django_pgpool import PoolTimeout
from django_pgpool.counters import BUCKETS
from django_pgpool.prometheus import COVERED_BY_HISTOGRAMS, METRICS, register
from testproject.library.models import Author

from .helpers import eventually, pool_options

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def registry(fresh_pools: None) -> CollectorRegistry:
    connection.close()
    registry = CollectorRegistry()
    register(registry)
    return registry


def scrape(registry: CollectorRegistry, alias: str = "default") -> dict[str, float]:
    """Sample name -> value for one alias, parsed from the text a scrape returns."""
    text = generate_latest(registry).decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("alias") == alias
    }


def orm_queries(count: int, alias: str = "default") -> None:
    for _ in range(count):
        Author.objects.using(alias).count()
        connections[alias].close()


def test_queries_through_the_pool_move_the_request_and_usage_counters(
    registry: CollectorRegistry,
) -> None:
    orm_queries(1)
    before = scrape(registry)
    orm_queries(5)
    with django_pgpool.connection("default") as conn, conn.cursor() as cursor:
        cursor.execute("SELECT 1")
    after = scrape(registry)
    assert after["django_pgpool_requests_total"] == before["django_pgpool_requests_total"] + 6
    assert after["django_pgpool_usage_seconds_sum"] > before["django_pgpool_usage_seconds_sum"]
    assert after["django_pgpool_connections_in_use"] == 0
    assert after["django_pgpool_max_size"] == 8 and after["django_pgpool_min_size"] == 1


def test_the_gauges_follow_connections_taken_and_given_back(registry: CollectorRegistry) -> None:
    orm_queries(1)
    held = [django_pgpool.getconn("default") for _ in range(3)]
    during = scrape(registry)
    for conn in held:
        django_pgpool.putconn(conn)
    after = scrape(registry)
    assert during["django_pgpool_connections_in_use"] == 3
    assert during["django_pgpool_connections"] >= 3
    assert after["django_pgpool_connections_in_use"] == 0
    assert eventually(lambda: scrape(registry)["django_pgpool_connections_idle"] >= 3)


def test_server_connections_opened_and_their_cost_are_exposed_in_seconds(
    registry: CollectorRegistry,
) -> None:
    held = [django_pgpool.getconn("default") for _ in range(2)]
    for conn in held:
        django_pgpool.putconn(conn)
    values = scrape(registry)
    stats = django_pgpool.stats()["default"]
    assert values["django_pgpool_connections_opened_total"] == stats["connections_num"] >= 2
    # stats() rounds to the microsecond for display; the metric is not rounded.
    assert values["django_pgpool_connect_seconds_total"] == pytest.approx(
        stats["connections_ms"] / 1000, abs=1e-6
    )
    assert values["django_pgpool_connect_seconds_total"] > 0


def test_waiting_requests_and_timeouts_show_when_the_pool_is_exhausted(
    registry: CollectorRegistry,
) -> None:
    with pool_options(max_size=1, timeout=10):
        held = django_pgpool.getconn("default")
        before = scrape(registry)
        waiter = threading.Thread(target=orm_queries, args=(1,))
        waiter.start()
        assert eventually(lambda: scrape(registry)["django_pgpool_requests_waiting"] == 1)
        with pytest.raises(PoolTimeout):
            django_pgpool.getconn("default", timeout=0.05)
        django_pgpool.putconn(held)
        waiter.join(10)
        after = scrape(registry)
    assert after["django_pgpool_requests_waiting"] == 0
    assert after["django_pgpool_request_timeouts_total"] == 1
    assert after["django_pgpool_request_errors_total"] == 1
    assert (
        after["django_pgpool_requests_queued_total"]
        - before.get("django_pgpool_requests_queued_total", 0)
        == 2
    )
    assert after["django_pgpool_request_wait_seconds_total"] > 0
    assert after["django_pgpool_request_wait_max_seconds"] > 0


@pytest.mark.django_db(transaction=True, databases=["default", "replica"])
def test_each_alias_has_its_own_series(registry: CollectorRegistry) -> None:
    orm_queries(2, "default")
    orm_queries(3, "replica")
    assert scrape(registry, "default")["django_pgpool_requests_total"] == 2
    assert scrape(registry, "replica")["django_pgpool_requests_total"] == 3


def test_a_closed_pool_has_no_series_left(registry: CollectorRegistry) -> None:
    orm_queries(1)
    assert scrape(registry)
    django_pgpool.close_pools()
    assert scrape(registry) == {}
    text = generate_latest(registry).decode()
    assert "# TYPE django_pgpool_connections_in_use gauge" in text  # still described


def test_every_pool_statistic_is_exported_with_its_own_name(registry: CollectorRegistry) -> None:
    orm_queries(1)
    stats = django_pgpool.stats()["default"]
    assert {spec.stat for spec in METRICS} | COVERED_BY_HISTOGRAMS == set(stats)
    names = [spec.name for spec in METRICS]
    assert len(set(names)) == len(names)
    values = scrape(registry)
    for spec in METRICS:
        exposed = f"{spec.name}_total" if spec.counter else spec.name
        expected = stats[spec.stat] * spec.scale
        assert values[exposed] == pytest.approx(expected, abs=1e-6), spec.stat
    # The total time connections were held is the usage histogram's sum.
    assert values["django_pgpool_usage_seconds_sum"] == pytest.approx(
        stats["usage_ms"] / 1000, abs=1e-6
    )


@pytest.fixture
def default_registry() -> Iterator[None]:
    yield
    collector = django_pgpool.prometheus._registered.pop(REGISTRY, None)
    if collector is not None:
        REGISTRY.unregister(collector)


def test_register_uses_prometheus_clients_default_registry_once(
    default_registry: None, fresh_pools: None
) -> None:
    collector = register()
    assert register() is collector
    orm_queries(4)
    assert REGISTRY.get_sample_value("django_pgpool_requests_total", {"alias": "default"}) == 4


def test_registering_twice_on_a_registry_keeps_one_collector(registry: Any) -> None:
    assert register(registry) is register(registry)
    orm_queries(1)
    text = generate_latest(registry).decode()
    assert text.count('django_pgpool_requests_total{alias="default"}') == 1


def histogram(registry: CollectorRegistry, name: str, alias: str = "default") -> dict[str, float]:
    """``le`` -> cumulative count of one histogram, with ``count`` and ``sum``."""
    text = generate_latest(registry).decode()
    series: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("alias") != alias or not sample.name.startswith(name):
                continue
            if sample.name == f"{name}_bucket":
                series[sample.labels["le"]] = sample.value
            elif sample.name in (f"{name}_count", f"{name}_sum"):
                series[sample.name.rsplit("_", 1)[1]] = sample.value
    return series


def test_every_checkout_is_counted_in_the_acquire_histogram_from_microseconds_up(
    registry: CollectorRegistry,
) -> None:
    orm_queries(1)
    before = histogram(registry, "django_pgpool_acquire_seconds")
    orm_queries(20)
    after = histogram(registry, "django_pgpool_acquire_seconds")
    assert after["count"] - before["count"] == 20
    assert after["+Inf"] == after["count"]
    bounds = [*(float(le) for le in after if le not in ("count", "sum", "+Inf"))]
    assert bounds == list(BUCKETS) and bounds[0] == 1e-6
    cumulative = [after[le] for le in after if le not in ("count", "sum")]
    assert cumulative == sorted(cumulative)
    # An uncontended checkout from the idle stack takes microseconds, not milliseconds.
    assert after["0.01"] - before["0.01"] == 20
    assert 0 < after["sum"] - before["sum"] < 20 * 0.01


def test_a_wait_for_a_connection_lands_in_the_acquire_histogram_at_its_length(
    registry: CollectorRegistry,
) -> None:
    with pool_options(max_size=1, timeout=10):
        held = django_pgpool.getconn("default")
        waiter = threading.Thread(target=orm_queries, args=(1,))
        waiter.start()
        assert eventually(lambda: scrape(registry)["django_pgpool_requests_waiting"] == 1)
        threading.Event().wait(0.3)
        django_pgpool.putconn(held)
        waiter.join(10)
        after = histogram(registry, "django_pgpool_acquire_seconds")
    assert after["count"] == 2
    assert after["0.25"] == 1 and after["+Inf"] == 2  # the one that waited: >= 0.3 s
    assert after["sum"] >= 0.3


def test_the_usage_histogram_counts_how_long_each_connection_was_held(
    registry: CollectorRegistry,
) -> None:
    conn = django_pgpool.getconn("default")
    threading.Event().wait(0.06)
    django_pgpool.putconn(conn)
    usage = histogram(registry, "django_pgpool_usage_seconds")
    assert usage["count"] == 1
    assert usage["0.05"] == 0 and usage["0.1"] == 1
    assert 0.06 <= usage["sum"] < 0.1


def test_discarded_connections_are_counted_by_reason(registry: CollectorRegistry) -> None:
    held = [django_pgpool.getconn("default") for _ in range(3)]
    django_pgpool.putconn(held.pop(), close=True)
    for conn in held:
        django_pgpool.putconn(conn)
    assert eventually(lambda: scrape(registry)["django_pgpool_connections_idle"] >= 2)
    django_pgpool.get_pool("default").drain()
    families = text_string_to_metric_families(generate_latest(registry).decode())
    discards = {
        sample.labels["reason"]: sample.value
        for family in families
        if family.name == "django_pgpool_connections_discarded"
        for sample in family.samples
        if sample.labels["alias"] == "default"
    }
    assert discards["closed_by_caller"] == 1
    assert discards["drained"] >= 2
    assert set(discards) == {"closed_by_caller", "drained"}


def test_a_counter_the_pool_gains_later_is_exported_as_a_counter(
    registry: CollectorRegistry,
) -> None:
    orm_queries(1)
    pool = django_pgpool.get_pool("default")
    with pool.counters.lock:
        pool.counters.values["role_changes"] = 3
    text = generate_latest(registry).decode()
    assert "# TYPE django_pgpool_role_changes_total counter" in text
    assert 'django_pgpool_role_changes_total{alias="default"} 3.0' in text


def test_counted_observations_are_added_to_a_prometheus_client_histogram_bucket_by_bucket() -> None:
    # How the multiprocess exporter hands the pool's histograms to prometheus_client.
    from prometheus_client import Histogram as ClientHistogram

    from django_pgpool.counters import Histogram
    from django_pgpool.prometheus import _add_observations

    counted = Histogram()
    for seconds in (2e-6, 2e-6, 0.003, 42.0, 120.0):
        counted.observe(seconds)
    registry = CollectorRegistry()
    client = ClientHistogram("h_seconds", "h", ["alias"], buckets=BUCKETS, registry=registry)
    _add_observations(client.labels("default"), counted)
    assert registry.get_sample_value("h_seconds_bucket", {"alias": "default", "le": "2.5e-06"}) == 2
    assert registry.get_sample_value("h_seconds_bucket", {"alias": "default", "le": "0.005"}) == 3
    assert registry.get_sample_value("h_seconds_bucket", {"alias": "default", "le": "50.0"}) == 4
    assert registry.get_sample_value("h_seconds_count", {"alias": "default"}) == 5
    assert registry.get_sample_value("h_seconds_sum", {"alias": "default"}) == pytest.approx(
        162.003004
    )
