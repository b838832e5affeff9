"""Django signals the pools send, so that a project can alert on them.

Both are sent with ``sender`` set to the database alias and never from inside
the pool's lock; a receiver that raises is logged, not propagated.

``pool_exhausted``
    A request gave up waiting for a connection (it gets ``PoolTimeout``).
    Keyword arguments: ``max_size``, ``timeout``, ``waiting`` (requests that
    were waiting), ``unreachable`` (True if the database could not be reached,
    rather than every connection being in use).

``connection_discarded``
    A connection was closed for a reason other than the pool closing.
    Keyword argument: ``reason`` ("it failed its check", "it reached
    max_lifetime", "it was idle for max_idle", "the pool was drained", ...).
"""

from __future__ import annotations

from typing import Any

from django.dispatch import Signal

pool_exhausted = Signal()
connection_discarded = Signal()

_SIGNALS = {"pool_exhausted": pool_exhausted, "connection_discarded": connection_discarded}


def send_pool_event(alias: str, event: str, info: dict[str, Any]) -> None:
    """Forward a pool's ``on_event`` callback to the matching Django signal."""
    signal = _SIGNALS.get(event)
    if signal is None or not signal.has_listeners(sender=alias):
        return
    details = {key: value for key, value in info.items() if key != "pool"}
    signal.send_robust(sender=alias, **details)
