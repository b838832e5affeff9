"""Whether a connection may be handed out, at the least cost that tells.

A connection taken from the pool goes through, in order: reading the answer
to its reset (sent when it was returned); the role its server reports, for an
alias that asked for one (:mod:`.roles`); then, for one that sat idle, the
cheap checks (used within ``check_after_idle``, not expired or drained,
nothing unexpected on its socket) and a round trip only when those don't
suffice. A connection found dead makes the others that sat idle beside it
*suspect*: the worker checks them at once, all within one bounded wait.
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING, Any

from .pooled_connection import RESET_LOST

if TYPE_CHECKING:
    from .pool import ConnectionPool

#: A connection idle for less than this is handed out without even the local
#: socket check: it worked a moment ago, and at this timescale a server-side
#: kill may not have reached the socket yet anyway.
SOCKET_CHECK_AFTER = 0.001


class Liveness:
    """The checks one pool makes before handing a connection out."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool_ref = weakref.ref(pool)
        config = pool.config
        self.check_after_idle = config.check_after_idle
        #: Idle longer than this, a connection is checked with a round trip
        #: (0 with CONN_HEALTH_CHECKS: every time).
        self.check_window = 0.0 if config.check_every_checkout else config.check_after_idle
        #: Connections last used before this get a round-trip check.
        self.suspect_before = 0.0

    def _pool(self) -> ConnectionPool:
        pool = self._pool_ref()
        assert pool is not None  # its callers hold it
        return pool

    def ready(self, conn: Any, handed_over: bool, check: bool | None) -> bool:
        """Whether a connection just taken may be handed out.

        One handed over by a returning thread or a connector is fresh; one
        taken from the idle stack is checked as its idle time requires.
        ``check``: see :meth:`ConnectionPool.getconn`.
        """
        pool = self._pool()
        entry = conn.pool_entry
        if entry.reset_pending and (failed := pool.connector.finish_reset(conn)):
            if failed == RESET_LOST:
                self.suspect_the_idle()
            return False
        # Only for an alias that asked for a role (one local read), or for a
        # connection whose server changed.
        roles = pool.roles
        if (entry.suspect or roles.rejects is not None) and not roles.acceptable(conn):
            return False
        if handed_over:
            return True
        # The common case, inline: recently used, not expired or drained,
        # nothing unexpected on its socket. No round trip.
        now = time.monotonic()
        last_used = entry.last_used
        idle_for = now - last_used
        window = self._window(check)
        return (
            idle_for <= window
            and last_used >= self.suspect_before
            and now < entry.expires_at
            and entry.generation == pool.generation
            and not conn.closed
            and (idle_for < SOCKET_CHECK_AFTER or not entry.socket_has_data())
        ) or self._usable(pool, conn, now, window)

    def _window(self, check: bool | None) -> float:
        """How long a connection may have sat idle and still go out without a round trip."""
        if check is None:
            return self.check_window
        return 0.0 if check else self.check_after_idle

    def _usable(self, pool: ConnectionPool, conn: Any, now: float, window: float) -> bool:
        """Whether an idle connection may be handed out, with a round trip only if needed."""
        entry = conn.pool_entry
        if conn.closed or entry.generation != pool.generation:
            return False
        if now >= entry.expires_at:
            pool.counters.add("connections_expired")
            return False
        if (
            now - entry.last_used <= window
            and entry.last_used >= self.suspect_before
            and not entry.socket_has_data()
        ):
            return True
        if pool.connector.check(conn) is None:
            return True
        self.suspect_the_idle()
        return False

    def suspect_the_idle(self) -> None:
        """A connection was found dead: have the worker check the others that sat idle.

        Whatever killed it (a restart, ``pg_terminate_backend``, a network cut)
        probably hit the others that sat idle beside it.
        """
        self.suspect_before = time.monotonic()
        self._pool().submit(self._check_suspects)

    def _check_suspects(self) -> None:
        suspect_before = self.suspect_before
        pool = self._pool()
        self.check_idle(
            pool.slots.take_idle(
                lambda idle: [c for c in idle if c.pool_entry.last_used < suspect_before]
            )
        )

    def check_idle(self, conns: list[Any], *, keepalive: bool = False) -> None:
        """Check idle connections taken out of the pool, all within one bounded wait.

        Those that answer go back (a keepalive puts them back at the bottom of
        the idle stack, where it found them); the others are retired.
        """
        if not conns:
            return
        pool = self._pool()
        errors = pool.connector.check_all(conns, keepalive=keepalive)
        for conn, error in zip(conns, errors, strict=True):
            if error is not None:
                pool.retire(conn, "it failed its check")
            elif not pool.slots.make_available(conn, least_recent=keepalive):
                pool.retire(conn, "the pool was closed")
