"""What the tests, the demo and the benchmark need around the testproject, and
no user of django_pgpool does (it is not installed with the package):

- :mod:`testsupport.pgserver`: find a PostgreSQL server, or start a throwaway
  cluster;
- :mod:`testsupport.servers`: server processes, HTTP clients and connection
  samplers for the end-to-end tests;
- :mod:`testsupport.pgbouncer`: PgBouncer in front of the test server;
- :mod:`testsupport.orm_checks`: ORM checks run against whatever the
  testproject's settings point at (``python -m testsupport.orm_checks``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

#: The repository: the directory holding ``testproject`` and this package.
REPO = Path(__file__).resolve().parent.parent


def eventually(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll until predicate() is truthy (server-side effects such as a backend
    exiting after its client closed take a few milliseconds); return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wsgi_environ(method: str, path: str, server_name: str) -> dict[str, Any]:
    """A WSGI environ for a request without a body, as a threaded server builds it."""
    return {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "CONTENT_LENGTH": "0",
        "SERVER_NAME": server_name,
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
