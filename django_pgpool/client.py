"""``manage.py dbshell`` for the pooled ENGINE.

Django's ``psql`` launcher reads the alias's settings as plain values. Two
things this backend allows would reach ``psql`` wrong: a callable
``PASSWORD`` (rotating credentials) would be passed on as the function's
``repr``, and the pool's ``connect_params`` callable, which may supply a
fresh password or another host, would be ignored. Both are resolved here,
once, just before ``psql`` starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from django.db.backends.postgresql.client import DatabaseClient as PostgreSQLClient

from .pooled_connection import evaluated

# libpq's parameter names, as connect_params() returns them, and where Django's
# launcher looks for each.
_SETTINGS_KEYS = {
    "host": "HOST",
    "port": "PORT",
    "user": "USER",
    "password": "PASSWORD",
    "dbname": "NAME",
    "database": "NAME",
}


class DatabaseClient(PostgreSQLClient):
    @classmethod
    def settings_to_cmd_args_env(
        cls, settings_dict: dict[str, Any], parameters: Iterable[str]
    ) -> tuple[list[str], dict[str, str] | None]:
        options = dict(settings_dict.get("OPTIONS") or {})
        pool = options.pop("pool", None)
        resolved = {
            key: evaluated(settings_dict.get(key))
            for key in ("HOST", "PORT", "NAME", "USER", "PASSWORD")
        }
        resolved["OPTIONS"] = {key: evaluated(value) for key, value in options.items()}
        connect_params = pool.get("connect_params") if isinstance(pool, Mapping) else None
        if callable(connect_params):
            for key, value in dict(connect_params()).items():
                if key in _SETTINGS_KEYS:
                    resolved[_SETTINGS_KEYS[key]] = value
                else:
                    resolved["OPTIONS"][key] = value
        return super().settings_to_cmd_args_env({**settings_dict, **resolved}, parameters)
