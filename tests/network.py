"""A network between the pool and PostgreSQL that a test can break.

:class:`Proxy` forwards TCP connections to the server, two threads per
connection, and can stop forwarding (every flow, or one) while every socket
stays open: to the pool, the server has stopped answering, as a hung server
or a NAT that forgot the flow looks. Both kernels still acknowledge what is
sent, so TCP itself notices nothing; only the pool's own time limits can.

:class:`DroppingLink` puts the proxy behind a virtual cable (a veth pair into
a network namespace of its own) that :meth:`~DroppingLink.cut` unplugs:
packets are dropped, as with a pulled cable or a firewall that drops them,
and TCP's own keepalives and ``tcp_user_timeout`` apply. It needs Linux and
CAP_NET_ADMIN (root); :func:`dropping_link_or_skip` skips a test without.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import queue
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest

_PUMP_TICK = 0.02


class Flow:
    """One client connection through the proxy, and its upstream connection."""

    def __init__(self, proxy: Proxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        #: The client's port: how a pooled connection is matched to its flow.
        self.client_port = int(client.getpeername()[1])
        self.silent = False
        #: Set for good when the flow was quiet longer than the proxy's idle cutoff.
        self.forgotten = False
        self.last_forwarded = time.monotonic()
        self.closed = False

    def silence(self) -> None:
        """Stop forwarding this flow's bytes (both ways) until :meth:`heal`."""
        self.silent = True

    def heal(self) -> None:
        self.silent = False

    @property
    def forwarding(self) -> bool:
        return not (self.silent or self.proxy.silent or self.forgotten)

    def pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while not self.closed:
                cutoff = self.proxy.idle_cutoff
                if cutoff is not None and time.monotonic() - self.last_forwarded > cutoff:
                    self.forgotten = True
                readable, _, _ = select.select([source], [], [], _PUMP_TICK)
                if not self.forwarding:
                    time.sleep(_PUMP_TICK)  # the bytes wait in the kernel's buffers
                    continue
                if not readable:
                    continue
                data = source.recv(65536)
                if not data:
                    break
                target.sendall(data)
                self.last_forwarded = time.monotonic()
        except OSError:
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.closed = True
        for sock in (self.client, self.upstream):
            with suppress(OSError):
                sock.close()


class Proxy:
    """A TCP proxy to ``upstream`` that can go silent.

    It listens on ``listener`` if given (a socket already bound), else on a
    free loopback port. ``idle_cutoff`` (seconds) makes it behave like a NAT
    or firewall that forgets flows quiet for longer: such a flow is silent
    for good.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        listener: socket.socket | None = None,
        idle_cutoff: float | None = None,
    ) -> None:
        self.upstream = upstream
        if listener is None:
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
        self.listener = listener
        self.listener.listen(64)
        self.host, self.port = self.listener.getsockname()[:2]
        self.idle_cutoff = idle_cutoff
        #: Forward nothing, on any flow, old or new.
        self.silent = False
        self.flows: list[Flow] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="test-proxy", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                readable, _, _ = select.select([self.listener], [], [], 0.05)
                if not readable:
                    continue
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            flow = Flow(self, client, upstream)
            self.flows.append(flow)
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=flow.pump, args=(source, target), name="test-proxy-pump", daemon=True
                ).start()

    def connect_kwargs(self, server: Any, **overrides: Any) -> dict[str, Any]:
        """``server``'s connection parameters, through this proxy."""
        return server.connect_kwargs(host=self.host, port=self.port, **overrides)

    def flow_of(self, conn: Any) -> Flow:
        """The flow carrying a psycopg2 connection."""
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            port = int(sock.getsockname()[1])
        finally:
            sock.close()
        return next(flow for flow in self.flows if flow.client_port == port)

    def silence(self) -> None:
        """Forward nothing, on every flow (new ones included), until :meth:`heal`."""
        self.silent = True

    def heal(self) -> None:
        self.silent = False
        for flow in self.flows:
            flow.heal()

    def close(self) -> None:
        self._closed = True
        with suppress(OSError):
            self.listener.close()
        self._thread.join(2)
        for flow in self.flows:
            flow.close()


# ---------------------------------------------------------------------- a cable to cut

_CLONE_NEWNET = 0x40000000
_links = itertools.count()


class DroppingLink:
    """A veth pair into a network namespace of its own, with a proxy at the far end.

    The pool connects to :attr:`proxy` across the link; :meth:`cut` takes the
    far end down so that every packet either way is dropped, :meth:`heal`
    brings it back.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        number = next(_links)
        tag = f"{os.getpid() % 10000}x{number % 100}"
        self.near, self.far = f"pgn{tag}", f"pgf{tag}"
        subnet = f"10.213.{os.getpid() % 200 + 20}"
        self.near_address = f"{subnet}.{4 * (number % 60) + 1}"
        self.address = f"{subnet}.{4 * (number % 60) + 2}"
        self._commands: queue.Queue[list[str] | None] = queue.Queue()
        self._results: queue.Queue[BaseException | socket.socket | None] = queue.Queue()
        self._thread = threading.Thread(target=self._namespace, name="test-netns", daemon=True)
        self._thread.start()
        listener = self._results.get(timeout=10)
        if not isinstance(listener, socket.socket):
            self._thread.join(5)
            raise RuntimeError(f"cannot make a network namespace: {listener}")
        try:
            _ip("addr", "add", f"{self.near_address}/30", "dev", self.near)
            _ip("link", "set", self.near, "up")
        except BaseException:
            self.close()
            raise
        self.proxy = Proxy(upstream, listener=listener)

    def _namespace(self) -> None:
        """The thread that lives in the namespace (namespaces belong to threads)."""
        try:
            if ctypes.CDLL(None, use_errno=True).unshare(_CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            # Commands started from this thread run in its namespace.
            _ip("link", "add", self.far, "type", "veth", "peer", "name", self.near, "netns",
                str(os.getpid()))  # fmt: skip
            _ip("addr", "add", f"{self.address}/30", "dev", self.far)
            _ip("link", "set", self.far, "up")
            listener = socket.socket()
            listener.bind((self.address, 0))
        except BaseException as exc:
            self._results.put(exc)
            return
        self._results.put(listener)
        while (command := self._commands.get()) is not None:
            try:
                _ip(*command)
            except BaseException as exc:
                self._results.put(exc)
            else:
                self._results.put(None)

    def _in_namespace(self, *command: str) -> None:
        self._commands.put(list(command))
        error = self._results.get(timeout=10)
        if isinstance(error, BaseException):
            raise error

    def cut(self) -> None:
        """Drop every packet across the link, both ways, from now on."""
        self._in_namespace("link", "set", self.far, "down")

    def heal(self) -> None:
        self._in_namespace("link", "set", self.far, "up")

    def connect_kwargs(self, server: Any, **overrides: Any) -> dict[str, Any]:
        return self.proxy.connect_kwargs(server, **overrides)

    def close(self) -> None:
        proxy = getattr(self, "proxy", None)
        if proxy is not None:
            proxy.close()
        self._commands.put(None)
        self._thread.join(5)
        with suppress(subprocess.CalledProcessError):
            _ip("link", "del", self.near)  # and its peer with it


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextmanager
def dropping_link_or_skip(upstream: tuple[str, int]) -> Iterator[DroppingLink]:
    """A :class:`DroppingLink` to ``upstream``; the test is skipped where none can be made."""
    try:
        link = DroppingLink(upstream)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        pytest.skip(f"needs a network namespace (Linux, CAP_NET_ADMIN): {exc}")
    try:
        yield link
    finally:
        link.close()


class Outcome:
    """What an action run by :func:`within` did, and how long it took."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.result: Any = None
        self.error: BaseException | None = None


def within(limit: float, action: Callable[[], Any]) -> Outcome:
    """Run ``action()`` in a thread of its own and wait up to ``limit`` seconds for it.

    The test fails, rather than hangs, if it is still blocked then (the
    thread is left behind: a daemon, released when the test heals the
    network).
    """
    outcome = Outcome()
    started = time.monotonic()

    def run() -> None:
        try:
            outcome.result = action()
        except BaseException as exc:
            outcome.error = exc
        outcome.seconds = time.monotonic() - started

    thread = threading.Thread(target=run, name="test-within", daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"still blocked after {limit:g} s"
    return outcome
