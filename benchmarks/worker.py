"""The in-process mode's worker: one strategy's testproject, called by threads.

    python -m benchmarks.worker THREADS      (started by the runner; settings in TESTPROJECT_*)

Each strategy runs in a process of its own (Django's native pool needs
psycopg 3, and Django binds its backend to one driver per process). The
worker sets Django up, answers ``{"ready": true}``, then reads one command per
line on stdin (``{"workload", "seed", "warmup", "duration"}``),
runs that load on its THREADS threads, which call Django's WSGI handler and
live as long as the worker (as a WSGI server's threads do), and answers
``{"latencies": [...], "failed": n}``. It closes its connections and exits at
the end of its input.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor


def main(threads: int) -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    import django

    django.setup()
    from django.core.handlers.wsgi import WSGIHandler
    from django.db import connections

    from .load import WORKLOADS, WsgiClient, run_load

    handler = WSGIHandler()
    client = WsgiClient(handler)
    ready = client.send("GET", "/health/")
    print(json.dumps({"ready": ready}), flush=True)
    with ThreadPoolExecutor(threads, thread_name_prefix="worker") as executor:
        for line in sys.stdin:
            command = json.loads(line)
            result = run_load(
                lambda: client,
                WORKLOADS[command["workload"]],
                threads=threads,
                warmup=command["warmup"],
                duration=command["duration"],
                seed=command["seed"],
                executor=executor,
            )
            answer = {"latencies": result.latencies, "failed": result.failed}
            print(json.dumps(answer), flush=True)
    connections.close_all()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
