"""gunicorn settings for Prometheus' multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set).

    PROMETHEUS_MULTIPROC_DIR=/run/shop-metrics TESTPROJECT_PROMETHEUS=1 \\
        python -m gunicorn -c testproject/gunicorn_prometheus.py testproject.wsgi:application

Each worker writes its metrics to files of its own in that directory, and a
scrape of ``/metrics`` (any worker) combines them. When a worker exits, its
"live" gauges (connections in use, idle, ...) must stop counting: gunicorn's
``child_exit`` hook, in the master, tells prometheus_client so.
"""

from typing import Any

worker_class = "gthread"


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
