"""A small but real Django project served by django_pgpool: the tests and the
benchmark run against it."""
