"""A database router for a primary and its streaming replicas.

::

    DATABASE_ROUTERS = ["django_pgpool.routers.PrimaryReplicaRouter"]
    PGPOOL_ROUTER = {
        "primary": "default",              # the alias writes go to
        "replicas": ["replica1", "replica2"],
        "max_lag": 5.0,                    # seconds; a replica further behind is skipped
        "check_interval": 1.0,             # seconds between two measurements
    }

- **Writes go to the primary; reads to a healthy replica** (one at random),
  or to the primary when none is healthy.
- **Read your writes.** Once a request wrote (anything the ORM routes as a
  write), or while it is inside a transaction on the primary, its reads go
  to the primary too, until the request ends. :func:`use_primary` does the
  same on demand.
- **Healthy** means: reachable, still a standby, and less than ``max_lag``
  seconds behind the primary. A background thread per process measures every
  replica each ``check_interval`` through the aliases' own pools; a request
  never waits for a measurement. A replica that fails is skipped from the
  next request on, and used again once it is healthy (each change is logged
  once, as a WARNING when it is skipped).
- **Lag** is how long ago the primary had written what the replica has not
  replayed yet: each measurement reads the primary's WAL position first, then
  each replica's replayed position; a replica that has not replayed what the
  primary had written at an earlier measurement is at least that far behind
  (to within ``check_interval``). This catches a replica whose link to the
  primary is cut, which by itself would report no lag. While the primary
  can't be read, and at the first measurement, the replica's own estimate is
  used instead (the age of the last transaction it replayed, while it has
  received WAL it has not replayed yet), which overstates the lag after a
  quiet period.

Each replica's lag and health appear in its alias's statistics
(``replica_lag_seconds``, ``replica_healthy``), in the Prometheus metrics and
in ``manage.py pgpool replicas``.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import request_finished, request_started, setting_changed
from django.db import connections

from .pooled_connection import exception_summary

logger = logging.getLogger("django_pgpool")

#: The project setting the router reads.
SETTING = "PGPOOL_ROUTER"

_PRIMARY_LSN = "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"
_REPLICA_STATE = """
SELECT pg_is_in_recovery(),
       pg_last_wal_replay_lsn() - '0/0'::pg_lsn,
       CASE WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn()
            THEN 0
            ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0)
       END
"""


@dataclass(frozen=True)
class RouterSettings:
    """``settings.PGPOOL_ROUTER``, validated."""

    primary: str = "default"
    replicas: tuple[str, ...] = ()
    max_lag: float = 5.0
    check_interval: float = 1.0
    #: How long a measurement waits for a connection of an alias (seconds).
    check_timeout: float = 2.0


def _seconds(raw: Mapping[str, Any], name: str, default: float) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 86400:
        raise ImproperlyConfigured(
            f"settings.{SETTING}[{name!r}] = {value!r} is invalid: a number of seconds "
            f"above 0 (for example {default:g})."
        )
    return float(value)


def read_settings() -> RouterSettings:
    """``settings.PGPOOL_ROUTER`` as :class:`RouterSettings` (``ImproperlyConfigured`` if wrong)."""
    from django.conf import settings

    raw = getattr(settings, SETTING, None)
    if raw is None:
        raise ImproperlyConfigured(
            f"django_pgpool.routers.PrimaryReplicaRouter needs settings.{SETTING}, for "
            f'example {{"primary": "default", "replicas": ["replica"], "max_lag": 5.0}}.'
        )
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured(f"settings.{SETTING} must be a dict, not {type(raw).__name__}.")
    unknown = set(raw) - {"primary", "replicas", "max_lag", "check_interval", "check_timeout"}
    if unknown:
        raise ImproperlyConfigured(
            f"settings.{SETTING} has unknown key(s) {sorted(unknown)}: it takes primary, "
            f"replicas, max_lag, check_interval and check_timeout."
        )
    primary = raw.get("primary", "default")
    replicas = raw.get("replicas", ())
    if isinstance(replicas, str) or not isinstance(replicas, Sequence):
        raise ImproperlyConfigured(
            f"settings.{SETTING}['replicas'] must be a list of database aliases, not {replicas!r}."
        )
    for alias in (primary, *replicas):
        if alias not in settings.DATABASES:
            raise ImproperlyConfigured(
                f"settings.{SETTING} names the alias {alias!r}, which is not in DATABASES "
                f"(aliases: {', '.join(settings.DATABASES)})."
            )
    if primary in replicas:
        raise ImproperlyConfigured(f"settings.{SETTING}: {primary!r} is the primary and a replica.")
    return RouterSettings(
        primary=primary,
        replicas=tuple(replicas),
        max_lag=_seconds(raw, "max_lag", 5.0),
        check_interval=_seconds(raw, "check_interval", 1.0),
        check_timeout=_seconds(raw, "check_timeout", 2.0),
    )


# ---------------------------------------------------------------------- read your writes

#: Whether the current request must read from the primary (it wrote).
_primary_only: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "django_pgpool_primary_only", default=False
)


def use_primary() -> None:
    """Read from the primary for the rest of this request (as after a write)."""
    _primary_only.set(True)


def _request_boundary(**kwargs: Any) -> None:
    _primary_only.set(False)


request_started.connect(_request_boundary, dispatch_uid="django_pgpool.routers.started")
request_finished.connect(_request_boundary, dispatch_uid="django_pgpool.routers.finished")


# ---------------------------------------------------------------------- health


@dataclass(frozen=True)
class ReplicaHealth:
    """One measurement of a replica."""

    alias: str
    healthy: bool
    #: Seconds behind the primary (None: could not be measured).
    lag: float | None
    #: "healthy", "lagging", "unreachable", "not a standby"
    state: str
    detail: str = ""
    server: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "lag": None if self.lag is None else round(self.lag, 3),
            "state": self.state,
            "detail": self.detail,
            "server": self.server,
        }


def _lsn_lag(history: Sequence[tuple[float, int]], replayed: int, now: float) -> float:
    """At least how old the oldest write ``replayed`` lacks is, from the primary's positions.

    ``history``: (time, the primary's WAL position then), oldest first. The
    replica lacks what the primary wrote by the first time its position was
    beyond ``replayed``; 0 if it has it all.
    """
    for taken_at, position in history:
        if position > replayed:
            return max(0.0, now - taken_at)
    return 0.0


class ReplicaMonitor:
    """Measures the replicas of one :class:`RouterSettings` (in its own thread once started)."""

    def __init__(self, config: RouterSettings, *, log: bool = True) -> None:
        self.config = config
        #: Whether changes of health are logged (the process's monitor does).
        self.log = log
        self.pid = os.getpid()
        self.health: dict[str, ReplicaHealth] = {}
        #: The replicas reads may go to now (replaced as a whole, read without a lock).
        self.healthy: tuple[str, ...] = ()
        self.measured = threading.Event()
        self._history: deque[tuple[float, int]] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pgpool-replicas", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop measuring; wait up to ``timeout`` for a measurement under way to end."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and thread.is_alive():
            thread.join(timeout)

    @property
    def alive(self) -> bool:
        return (
            self._thread is not None
            and self._thread.is_alive()
            and not self._stop.is_set()
            and self.pid == os.getpid()
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.measure()
            except Exception:  # pragma: no cover - never let the thread die
                logger.exception("the pgpool replica monitor failed")
            self._stop.wait(max(0.0, self.config.check_interval - (time.monotonic() - started)))

    # ------------------------------------------------------------------ measuring

    def measure(self) -> dict[str, ReplicaHealth]:
        """Measure every replica once; update :attr:`healthy` and the pools' statistics."""
        primary_position = self._primary_position()
        now = time.monotonic()
        if primary_position is not None:
            self._history.append((now, primary_position))
        keep = 2 * self.config.max_lag + 10 * self.config.check_interval
        while self._history and now - self._history[0][0] > keep:
            self._history.popleft()
        results = {
            alias: self._measure(alias, primary_position is not None)
            for alias in self.config.replicas
        }
        for alias, health in results.items():
            self._report(self.health.get(alias), health)
            pool = self._pool(alias)
            if pool is not None:
                pool.roles.replica = (health.lag, health.healthy)
        self.health = results
        self.healthy = tuple(alias for alias, health in results.items() if health.healthy)
        self.measured.set()
        return results

    def _pool(self, alias: str) -> Any:
        from django_pgpool import get_pool

        try:
            return get_pool(alias)
        except ImproperlyConfigured:
            return None  # not a pooled alias: measured all the same, with plain connections

    def _query(self, alias: str, sql: str) -> tuple[Any, str]:
        """One row of ``sql`` on ``alias`` (through its pool when it has one), and the server."""
        pool = self._pool(alias)
        if pool is None:
            wrapper = connections[alias]
            with wrapper.cursor() as cursor:
                cursor.execute(sql)
                row = cursor.fetchone()
            wrapper.close()
            return row, ""
        conn = pool.getconn(timeout=self.config.check_timeout)
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql)
                row = cursor.fetchone()
            return row, conn.pool_entry.server
        finally:
            pool.putconn(conn)

    def _primary_position(self) -> int | None:
        try:
            row, _ = self._query(self.config.primary, _PRIMARY_LSN)
        except Exception:
            return None  # unreachable, or a standby: the replicas' own view must do
        return int(row[0])

    def _measure(self, alias: str, primary_measured: bool) -> ReplicaHealth:
        try:
            row, server = self._query(alias, _REPLICA_STATE)
        except Exception as exc:
            detail = f"unreachable ({exception_summary(exc)})"
            return ReplicaHealth(alias, False, None, "unreachable", detail)
        in_recovery, replayed, replay_age = row
        if not in_recovery:
            detail = "not a standby: it is not in recovery (promoted?)"
            return ReplicaHealth(alias, False, None, "not a standby", detail, server)
        if primary_measured and replayed is not None and len(self._history) > 1:
            lag = _lsn_lag(self._history, int(replayed), time.monotonic())
        else:
            # No earlier position of the primary to compare with (the first
            # measurement, or the primary can't be read): the replica's own view.
            lag = float(replay_age or 0.0)
        if lag > self.config.max_lag:
            detail = f"lagging {lag:.1f} s behind the primary (max_lag {self.config.max_lag:g} s)"
            return ReplicaHealth(alias, False, lag, "lagging", detail, server)
        return ReplicaHealth(alias, True, lag, "healthy", "", server)

    def _report(self, before: ReplicaHealth | None, now: ReplicaHealth) -> None:
        if not self.log:
            return
        if not now.healthy and (before is None or before.healthy):
            logger.warning("replica %r skipped: %s", now.alias, now.detail)
        elif now.healthy and before is not None and not before.healthy:
            logger.warning(
                "replica %r used again: %.1f s behind the primary", now.alias, now.lag or 0.0
            )


_monitor: ReplicaMonitor | None = None
_monitor_lock = threading.Lock()
_settings: RouterSettings | None = None


def current_settings() -> RouterSettings:
    global _settings
    config = _settings
    if config is None:
        config = _settings = read_settings()
    return config


def monitor() -> ReplicaMonitor:
    """This process's replica monitor, started on first use."""
    global _monitor
    current = _monitor
    if current is not None and current.alive:
        return current
    with _monitor_lock:
        current = _monitor
        if current is None or not current.alive:
            current = _monitor = ReplicaMonitor(current_settings())
            current.start()
    return current


def stop_monitor() -> None:
    """Stop this process's monitor (the next routed read starts another)."""
    global _monitor, _settings
    with _monitor_lock:
        if _monitor is not None:
            _monitor.stop()
        _monitor = None
        _settings = None


def _settings_changed(*, setting: str, **kwargs: Any) -> None:
    if setting in (SETTING, "DATABASES", "DATABASE_ROUTERS"):
        stop_monitor()


setting_changed.connect(_settings_changed, dispatch_uid="django_pgpool.routers.settings")


class PrimaryReplicaRouter:
    """Writes to the primary, reads to a healthy replica (see the module's documentation)."""

    def db_for_read(self, model: type[Any], **hints: Any) -> str:
        config = current_settings()
        if _primary_only.get() or connections[config.primary].in_atomic_block:
            return config.primary
        healthy = monitor().healthy
        if not healthy:
            return config.primary
        return healthy[0] if len(healthy) == 1 else random.choice(healthy)

    def db_for_write(self, model: type[Any], **hints: Any) -> str:
        _primary_only.set(True)
        return current_settings().primary

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None:
        config = current_settings()
        ours = {config.primary, *config.replicas}
        if obj1._state.db in ours and obj2._state.db in ours:
            return True  # the same data
        return None

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        # Replicas get their schema through replication.
        return False if db in current_settings().replicas else None
