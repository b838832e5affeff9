"""gunicorn settings for gevent workers with ``--preload``.

    python -m gunicorn -c testproject/gunicorn_gevent_preload.py --preload \\
        testproject.wsgi:application

With ``--preload`` the application (Django, and anything it connects at
start-up) is loaded in the master before the workers fork, so gevent must
patch the standard library before that happens: here, first thing.
"""

from gevent import monkey  # type: ignore[import-untyped]

monkey.patch_all()

from testproject.gunicorn_gevent import post_fork, worker_class, worker_connections  # noqa: E402

__all__ = ["post_fork", "worker_class", "worker_connections"]
