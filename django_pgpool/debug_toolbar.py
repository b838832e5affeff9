"""A django-debug-toolbar panel: the pool as the current request saw it.

``pip install "django-pgpool[debug-toolbar]"``, then in the settings (beside
django-debug-toolbar's own installation)::

    from debug_toolbar.settings import PANELS_DEFAULTS

    DEBUG_TOOLBAR_PANELS = [*PANELS_DEFAULTS, "django_pgpool.debug_toolbar.PoolPanel"]

For each connection the request took, by alias: how long it waited for it,
whether it reused one the pool held (with that connection's age and backend
pid) or got a new one, whether the connection's session reset was still to be
read, and how many connections the pool had in use, idle and waiting at that
moment; then any warning the pool logged during the request. The toolbar's
side bar shows the total wait.

It costs nothing unless the toolbar is shown for a request: only then does the
panel ask the pool to tell it about checkouts (:mod:`django_pgpool.observers`),
and only for that request (a context variable), with a log handler on the
``django_pgpool`` logger for as long as the request runs.
"""

from __future__ import annotations

import logging
import threading
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from debug_toolbar.panels import Panel
from django.utils.html import format_html, format_html_join

from . import observers, registry

if TYPE_CHECKING:
    from django.http import HttpRequest, HttpResponse

    from .observers import Checkout


class Recording:
    """What the pool did for one request."""

    __slots__ = ("checkouts", "warnings")

    def __init__(self) -> None:
        self.checkouts: list[dict[str, Any]] = []
        self.warnings: list[dict[str, str]] = []


_current: ContextVar[Recording | None] = ContextVar("django_pgpool_toolbar", default=None)
_active: list[Recording] = []
_lock = threading.Lock()


def _alias_of(pool: Any) -> str:
    for alias, current in registry.pools().items():
        if current is pool:
            return alias
    return str(pool.name)


def _observe(checkout: Checkout) -> None:
    recording = _current.get()
    if recording is None:
        return  # another request's checkout, while this panel records its own
    recording.checkouts.append(
        {
            "alias": _alias_of(checkout.pool),
            "wait_ms": checkout.waited * 1000.0,
            "reused": checkout.reused,
            "age_s": checkout.age,
            "backend_pid": checkout.backend_pid,
            "reset_pending": checkout.reset_pending,
            "in_use": checkout.in_use,
            "idle": checkout.idle,
            "waiting": checkout.waiting,
        }
    )


class _WarningsHandler(logging.Handler):
    """Keeps the pool's warnings for the recordings they concern."""

    def emit(self, record: logging.LogRecord) -> None:
        recording = _current.get()
        # A warning from the request's own thread is its own; one from the
        # pool's background threads (a failed reconnect) concerns every
        # request recording at that moment.
        targets = [recording] if recording is not None else list(_active)
        if not targets:
            return
        try:
            warning = {"level": record.levelname, "message": record.getMessage()}
        except Exception:
            self.handleError(record)
            return
        for target in targets:
            target.warnings.append(warning)


_handler = _WarningsHandler(logging.WARNING)


def start_recording() -> tuple[Recording, Token[Recording | None]]:
    """Record what the pool does for the current context (until :func:`stop_recording`)."""
    recording = Recording()
    token = _current.set(recording)
    with _lock:
        if not _active:
            observers.add_observer(_observe)
            logging.getLogger("django_pgpool").addHandler(_handler)
        _active.append(recording)
    return recording, token


def stop_recording(recording: Recording, token: Token[Recording | None]) -> None:
    with _lock:
        if recording in _active:
            _active.remove(recording)
            if not _active:
                observers.remove_observer(_observe)
                logging.getLogger("django_pgpool").removeHandler(_handler)
    try:
        _current.reset(token)
    except ValueError:  # not the context it was set in
        _current.set(None)


def _milliseconds(value: float) -> str:
    return f"{value:.3f} ms"


class PoolPanel(Panel):
    """django-debug-toolbar panel: waits, reuse and pool state per alias for this request."""

    title = "Connection pool"
    nav_title = "Connection pool"
    is_async = True

    _recording: tuple[Recording, Token[Recording | None]] | None = None

    @property
    def nav_subtitle(self) -> str:
        stats = self.get_stats()  # type: ignore[no-untyped-call]
        if not stats:
            return ""
        count = len(stats["checkouts"])
        connections = "1 connection" if count == 1 else f"{count} connections"
        return f"{_milliseconds(stats['total_wait_ms'])} wait, {connections}"

    def enable_instrumentation(self) -> None:
        self._recording = start_recording()

    def disable_instrumentation(self) -> None:
        if self._recording is not None:
            stop_recording(*self._recording)

    def generate_stats(self, request: HttpRequest, response: HttpResponse) -> None:
        if self._recording is None:
            return
        recording = self._recording[0]
        checkouts = list(recording.checkouts)
        self.record_stats(  # type: ignore[no-untyped-call]
            {
                "checkouts": checkouts,
                "warnings": list(recording.warnings),
                "total_wait_ms": sum(checkout["wait_ms"] for checkout in checkouts),
            }
        )

    @property
    def content(self) -> str:
        stats = self.get_stats()  # type: ignore[no-untyped-call]
        checkouts = stats.get("checkouts", [])
        warnings = stats.get("warnings", [])
        if checkouts:
            rows = format_html_join(
                "\n",
                "<tr><td>{}</td><td class='djdt-pgpool-wait'>{}</td><td>{}</td><td>{}</td>"
                "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                (
                    (
                        checkout["alias"],
                        _milliseconds(checkout["wait_ms"]),
                        "reused" if checkout["reused"] else "new",
                        f"{checkout['age_s']:.1f} s",
                        checkout["backend_pid"],
                        "yes" if checkout["reset_pending"] else "no",
                        checkout["in_use"],
                        checkout["idle"],
                        checkout["waiting"],
                    )
                    for checkout in checkouts
                ),
            )
            table = format_html(
                "<table><thead><tr><th>Alias</th><th>Waited</th><th>Connection</th>"
                "<th>Age</th><th>Backend pid</th><th>Reset pending</th>"
                "<th>In use</th><th>Idle</th><th>Waiting</th></tr></thead>"
                "<tbody>{}</tbody></table>",
                rows,
            )
        else:
            table = format_html("<p>{}</p>", "This request took no connection from a pool.")
        summary = format_html(
            "<p>Waited <strong class='djdt-pgpool-total-wait'>{}</strong> in all for {} "
            "connection(s). In use, idle and waiting: the pool when the connection was "
            "taken, the connection included.</p>",
            _milliseconds(stats.get("total_wait_ms", 0.0)),
            len(checkouts),
        )
        if warnings:
            items = format_html_join(
                "\n",
                "<li><strong>{}</strong> {}</li>",
                ((warning["level"], warning["message"]) for warning in warnings),
            )
            logged = format_html("<h4>Pool warnings</h4><ul>{}</ul>", items)
        else:
            logged = format_html("<p>{}</p>", "The pool logged no warning during this request.")
        return str(format_html("{}{}{}", summary, table, logged))
