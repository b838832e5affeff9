"""The benchmark: django_pgpool against the other ways a Django site gets its
connections (``python3 -m testproject bench``; ``--help`` for its options).

- :mod:`benchmarks.runner`: the command line, the rounds and their interleaving;
- :mod:`benchmarks.strategies`: the connection strategies compared;
- :mod:`benchmarks.load`: the workloads and the clients that send them;
- :mod:`benchmarks.targets`: the processes that serve each strategy (gunicorn,
  or :mod:`benchmarks.worker` in-process);
- :mod:`benchmarks.database`: the server and the run's own database;
- :mod:`benchmarks.report` and :mod:`benchmarks.chart`: tables, JSON and the chart;
- :mod:`benchmarks.checkout`: the checkout micro-benchmark.
"""
