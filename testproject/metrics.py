"""``/metrics``: the pools' Prometheus metrics, from one process or all of them.

With ``PROMETHEUS_MULTIPROC_DIR`` set (several worker processes behind one
port), each scrape combines what every process wrote there; otherwise it reads
this process's registry. The pools' metrics are registered in
``LibraryConfig.ready()`` when ``TESTPROJECT_PROMETHEUS`` is set.
"""

from __future__ import annotations

import os

from django.http import HttpRequest, HttpResponse


def metrics(request: HttpRequest) -> HttpResponse:
    # Imported here: the testproject runs without prometheus_client too.
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
