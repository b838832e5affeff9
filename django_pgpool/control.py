"""Pause, resume and drain the pools of every process, from a deploy script.

A server runs the project in many processes (gunicorn and uvicorn workers,
Celery children), each with pools of its own, and a deploy script can reach
none of them directly. With ``settings.PGPOOL_CONTROL_FILE`` set, every
process that builds a pool starts one small thread that looks at that file
once a second (an ``os.stat``; the file is read only when it changed) and
applies what it says to its pools; ``manage.py pgpool pause|resume|drain``
writes it::

    {"version": 7, "aliases": {"default": {"paused": true, "drains": 2}}}

- ``paused``: new checkouts wait (:meth:`ConnectionPool.pause`) until the
  file says otherwise; a process started meanwhile starts paused.
- ``drains``: each increment retires every connection of the alias once
  (:meth:`ConnectionPool.drain`); a process started later has only new ones.

Each process answers in a directory beside the file (``<file>.d/``), one small
JSON file per process (host and pid), rewritten when anything in it changes
and every few seconds: the version it applied, and per alias whether it is
paused, its connections in use and the servers its connections reach. That
is how ``manage.py pgpool pause --wait`` knows that every process finished
the requests it was serving, and ``pgpool status`` shows where each process's
connections go. Answers of processes that are gone (a pid that no longer
runs on this host, or silent for :data:`STALE_AFTER` seconds) are ignored.

The file may be on a volume several hosts share; writes are atomic (a
temporary file renamed) and serialised with a lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import process

if TYPE_CHECKING:
    from .pool import ConnectionPool

logger = logging.getLogger("django_pgpool")

#: The project setting naming the control file (None: no control from outside).
SETTING = "PGPOOL_CONTROL_FILE"

#: How often each process looks at the control file (seconds).
POLL_INTERVAL = 1.0

#: A process rewrites its answer at least this often (seconds)...
ANSWER_REFRESH = 5.0
#: ...and an answer older than this is from a process that is gone (seconds).
STALE_AFTER = 15.0


# ---------------------------------------------------------------------- the file


@dataclass
class AliasState:
    """What the control file says about one alias."""

    paused: bool = False
    drains: int = 0


@dataclass
class ControlState:
    """The control file's content."""

    version: int = 0
    aliases: dict[str, AliasState] = field(default_factory=dict)

    def alias(self, alias: str) -> AliasState:
        return self.aliases.get(alias) or AliasState()

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "aliases": {
                alias: {"paused": state.paused, "drains": state.drains}
                for alias, state in sorted(self.aliases.items())
            },
            "updated": time.time(),
        }


def read_state(path: str | os.PathLike[str]) -> ControlState:
    """The control file's content; an absent or unreadable file says "running"."""
    try:
        with open(path) as handle:
            raw = json.load(handle)
        aliases = {
            str(alias): AliasState(bool(value.get("paused")), int(value.get("drains", 0)))
            for alias, value in (raw.get("aliases") or {}).items()
        }
        return ControlState(int(raw.get("version", 0)), aliases)
    except (OSError, ValueError, TypeError, AttributeError):
        return ControlState()


def _write_json(path: Path, content: dict[str, Any]) -> None:
    """Replace ``path`` atomically (readers see the old or the new file, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(content, handle)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def change(
    path: str | os.PathLike[str],
    aliases: Sequence[str],
    *,
    paused: bool | None = None,
    drain: bool = False,
) -> ControlState:
    """Write a new state for ``aliases`` (pause or resume them, drain them once); return it."""
    target = Path(path)
    with _locked(target):
        state = read_state(target)
        for alias in aliases:
            current = state.aliases.setdefault(alias, AliasState())
            if paused is not None:
                current.paused = paused
            if drain:
                current.drains += 1
        state.version += 1
        _write_json(target, state.as_dict())
    return state


# ---------------------------------------------------------------------- answers


def answers_directory(path: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(path)}.d")


def _pid_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def answers(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The answers of the processes that run now, oldest pid first.

    Answers of processes that are gone are removed.
    """
    found = []
    host = socket.gethostname()
    now = time.time()
    directory = answers_directory(path)
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        file = directory / name
        try:
            with open(file) as handle:
                answer = json.load(handle)
            age = now - file.stat().st_mtime
        except (OSError, ValueError):
            continue
        gone = age > STALE_AFTER or (
            answer.get("host") == host and _pid_is_gone(int(answer.get("pid", 0)))
        )
        if gone:
            with contextlib.suppress(OSError):
                file.unlink()
            continue
        found.append(answer)
    return sorted(found, key=lambda answer: (answer.get("host", ""), answer.get("pid", 0)))


def pending(
    path: str | os.PathLike[str], version: int, aliases: Sequence[str], *, idle: bool
) -> list[str]:
    """What keeps the processes from having applied ``version`` (with ``idle``: and
    finished with every connection of ``aliases``); an empty list once they all have."""
    waiting_for = []
    for answer in answers(path):
        who = f"process {answer.get('pid')} on {answer.get('host')}"
        if int(answer.get("version", 0)) < version:
            waiting_for.append(f"{who} has not applied the change yet")
            continue
        if idle:
            for alias in aliases:
                in_use = int((answer.get("aliases") or {}).get(alias, {}).get("in_use", 0))
                if in_use:
                    waiting_for.append(f"{who} still uses {in_use} connection(s) of {alias!r}")
    return waiting_for


def wait_for(
    path: str | os.PathLike[str],
    version: int,
    aliases: Sequence[str],
    *,
    idle: bool,
    timeout: float,
) -> list[str]:
    """Wait up to ``timeout`` for :func:`pending` to be empty; what is still pending."""
    deadline = time.monotonic() + timeout
    while True:
        left = pending(path, version, aliases, idle=idle)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


# ---------------------------------------------------------------------- each process


class Watcher:
    """The thread of one process that applies the control file to its pools."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()
        self._lock = threading.Lock()
        #: What was applied per alias: (paused, drains).
        self._applied: dict[str, tuple[bool, int]] = {}
        self._version = 0
        self._stamp: tuple[int, int, int] | None = None
        self._answer: dict[str, Any] | None = None
        self._answered_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pgpool-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def adopt(self, alias: str, pool: ConnectionPool) -> None:
        """A pool was built in this process: it starts as the file says (paused or not)."""
        state = read_state(self.path)
        wanted = state.alias(alias)
        with self._lock:
            # A new pool's connections are all new: earlier drains are done.
            self._applied[alias] = (wanted.paused, wanted.drains)
            self._version = max(self._version, state.version)
        if wanted.paused:
            pool.pause()

    def _run(self) -> None:
        while not self._stop.wait(POLL_INTERVAL):
            if os.getpid() != self.pid:
                process.park_forever()  # a green thread copied into a forked child
            try:
                self.poll()
            except Exception:  # pragma: no cover - never let the thread die
                logger.exception("the pgpool control thread failed (file %s)", self.path)

    def poll(self) -> None:
        """Apply the file if it changed, and answer."""
        try:
            info = os.stat(self.path)
            stamp: tuple[int, int, int] | None = (info.st_mtime_ns, info.st_size, info.st_ino)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._stamp = stamp
            self.apply(read_state(self.path))
        self.answer()

    def apply(self, state: ControlState) -> None:
        from . import registry

        for alias, pool in registry.pools().items():
            wanted = state.alias(alias)
            with self._lock:
                paused, drains = self._applied.get(alias, (False, wanted.drains))
                self._applied[alias] = (wanted.paused, wanted.drains)
            if wanted.drains > drains:
                logger.info("pool %r: drained by the control file %s", pool.name, self.path)
                pool.drain()
            if wanted.paused and not paused:
                pool.pause()
            elif paused and not wanted.paused:
                pool.resume()
        with self._lock:
            self._version = max(self._version, state.version)

    def answer(self) -> None:
        """Write this process's answer if it changed, or to say it is still here."""
        from . import registry

        aliases = {}
        for alias, pool in registry.pools().items():
            stats = pool.stats()
            aliases[alias] = {
                "paused": pool.paused,
                "in_use": stats["pool_in_use"],
                "waiting": stats["requests_waiting"],
                "servers": pool.roles.servers(),
            }
        content = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": self._version,
            "aliases": aliases,
        }
        now = time.monotonic()
        if content == self._answer and now - self._answered_at < ANSWER_REFRESH:
            return
        self._answer = content
        self._answered_at = now
        try:
            _write_json(
                answers_directory(self.path) / f"{content['host']}-{content['pid']}.json",
                {**content, "time": time.time()},
            )
        except OSError as exc:
            logger.warning("pgpool control: cannot answer in %s: %s", self.path, exc)


_watcher: Watcher | None = None
_watcher_lock = threading.Lock()


def configured_path() -> str | None:
    """``settings.PGPOOL_CONTROL_FILE``, or None."""
    try:
        from django.conf import settings

        path = getattr(settings, SETTING, None)
    except Exception:  # settings not configured: a pool used without Django
        return None
    return os.fspath(path) if path else None


def watcher() -> Watcher | None:
    """This process's watcher, if one runs."""
    current = _watcher
    if current is not None and current.pid == os.getpid() and current.alive:
        return current
    return None


def adopt(alias: str, pool: ConnectionPool) -> None:
    """Put a newly built pool under the control file, if one is configured."""
    global _watcher
    path = configured_path()
    if path is None:
        return
    with _watcher_lock:
        current = watcher()
        if current is None or current.path != path:
            if current is not None:
                current.stop()
            current = _watcher = Watcher(path)
            current.start()
    current.adopt(alias, pool)


def stop() -> None:
    """Stop this process's watcher (the next pool built starts another)."""
    global _watcher
    with _watcher_lock:
        if _watcher is not None:
            _watcher.stop()
            _watcher = None
