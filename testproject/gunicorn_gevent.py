"""gunicorn settings for serving the testproject with gevent workers.

    python -m gunicorn -c testproject/gunicorn_gevent.py testproject.wsgi:application

Each worker serves up to ``worker_connections`` requests at once, each in a
greenlet, and all of them share the worker's pool (``max_size`` connections):
greenlets beyond that wait for a connection, as threads would.
"""

worker_class = "gevent"
worker_connections = 1000


def post_fork(server: object, worker: object) -> None:
    # gunicorn's gevent worker patches the standard library (sockets, locks,
    # threading, sleep), so the pool's waits and its background worker become
    # greenlet-friendly. psycopg2 talks to PostgreSQL through libpq in C,
    # which no monkey-patching reaches: without this, a query that waits on
    # the server (a slow query, a row lock) blocks every greenlet of the worker.
    from psycogreen.gevent import patch_psycopg  # type: ignore  # ships no type information

    patch_psycopg()
