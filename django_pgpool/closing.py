"""Giving connections back from threads Django's request cycle never cleans up.

Django returns a thread's connections at the end of each request
(``request_finished``), in the thread that handled the request. Code that
runs elsewhere keeps its connection until something closes it: ORM calls made
through ``sync_to_async(..., thread_sensitive=False)`` (they run in the event
loop's executor threads, which live as long as the loop), thread pools of your
own, background threads. With a pool, each such thread pins one of its
``max_size`` connections. :func:`closing_connections` gives them back.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_state = threading.local()


def closing_connections(func: Callable[..., T]) -> Callable[..., T]:
    """Decorate a function run outside Django's request cycle so that the thread's
    database connections go back to their pools before and after each call (as
    Channels' ``database_sync_to_async`` does)::

        result = await sync_to_async(closing_connections(report), thread_sensitive=False)(pk)
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        from django.db import close_old_connections

        depth = getattr(_state, "depth", 0)
        _state.depth = depth + 1
        close_old_connections()
        try:
            return func(*args, **kwargs)
        finally:
            close_old_connections()
            _state.depth = depth

    return wrapper


def inside_closing_connections() -> bool:
    """Whether this thread is running a function wrapped by :func:`closing_connections`."""
    return bool(getattr(_state, "depth", 0))
