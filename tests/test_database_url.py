"""Pool options in DATABASE_URL: ``django_pgpool.url``, alone and after dj-database-url."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote, unquote

import dj_database_url
import psycopg2.extensions
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, transaction

import django_pgpool
from django_pgpool.config import PoolConfig, parse_pool_options
from django_pgpool.url import database_from_url, from_dj_database_url

from .aliases import temporary_alias
from .helpers import backends, run_python

URL = "postgres://shop:p%40ss%2Fw0rd@db.internal:6543/shop"


def url_error(url: str, **overrides: Any) -> str:
    with pytest.raises(ImproperlyConfigured) as caught:
        database_from_url(url, **overrides)
    message = str(caught.value)
    assert "p@ss" not in message and "p%40ss" not in message  # never the password
    return message


def test_a_url_becomes_a_django_pgpool_entry_with_every_connection_setting() -> None:
    assert database_from_url(URL) == {
        "ENGINE": "django_pgpool",
        "NAME": "shop",
        "USER": "shop",
        "PASSWORD": "p@ss/w0rd",
        "HOST": "db.internal",
        "PORT": "6543",
        "CONN_MAX_AGE": 0,
        "OPTIONS": {},
    }


def test_a_unix_socket_directory_can_be_the_host() -> None:
    entry = database_from_url("postgresql://%2Fvar%2Frun%2Fpostgresql/shop")
    assert (entry["HOST"], entry["PORT"], entry["NAME"]) == ("/var/run/postgresql", "", "shop")


def test_pool_parameters_are_converted_with_the_option_table() -> None:
    entry = database_from_url(
        f"{URL}?pool_min_size=2&pool_max_size=20&pool_timeout=5&pool_max_waiting=50"
        "&pool_max_lifetime=none&pool_max_idle=60.5&pool_check_after_idle=0"
        "&pool_reset=false&pool_leak_threshold=30&pool_name=reads"
    )
    pool = entry["OPTIONS"]["pool"]
    assert pool == {
        "min_size": 2,
        "max_size": 20,
        "timeout": 5.0,
        "max_waiting": 50,
        "max_lifetime": None,
        "max_idle": 60.5,
        "check_after_idle": 0.0,
        "reset": False,
        "leak_threshold": 30.0,
        "name": "reads",
    }
    assert isinstance(pool["min_size"], int) and isinstance(pool["timeout"], float)
    assert parse_pool_options("default", entry) == PoolConfig(**pool)


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("True", True), ("1", True), ("on", True), ("false", False), ("no", False)],
)
def test_reset_takes_the_usual_spellings_of_booleans(text: str, value: bool) -> None:
    assert database_from_url(f"{URL}?pool_reset={text}")["OPTIONS"]["pool"] == {"reset": value}


def test_other_parameters_are_libpq_connection_options_passed_as_they_are() -> None:
    entry = database_from_url(
        f"{URL}?sslmode=require&connect_timeout=5&application_name=shop-web-%7Bpid%7D"
        "&options=-c%20statement_timeout%3D5000&target_session_attrs=read-write&pool_max_size=4"
    )
    assert entry["OPTIONS"] == {
        "sslmode": "require",
        "connect_timeout": "5",
        "application_name": "shop-web-{pid}",
        "options": "-c statement_timeout=5000",
        "target_session_attrs": "read-write",
        "pool": {"max_size": 4},
    }


def test_django_options_of_the_postgresql_backend_are_understood() -> None:
    entry = database_from_url(
        f"{URL}?isolation_level=serializable&assume_role=shop_reader&currentSchema=tenant_7"
    )
    assert entry["OPTIONS"] == {
        "isolation_level": psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE,
        "assume_role": "shop_reader",
        "options": "-c search_path=tenant_7",
    }


def test_pool_false_turns_pooling_off_and_pool_true_keeps_the_defaults() -> None:
    assert database_from_url(f"{URL}?pool=false")["OPTIONS"] == {"pool": False}
    assert database_from_url(f"{URL}?pool=true")["OPTIONS"] == {"pool": {}}
    # Without a pool, CONN_MAX_AGE is Django's business again.
    assert database_from_url(f"{URL}?pool=false", CONN_MAX_AGE=60)["CONN_MAX_AGE"] == 60


def test_overrides_replace_the_urls_settings_and_merge_into_its_options() -> None:
    def configure(conn: Any) -> None:
        pass

    entry = database_from_url(
        f"{URL}?pool_max_size=4&sslmode=require",
        CONN_HEALTH_CHECKS=True,
        NAME="other",
        OPTIONS={"pool": {"configure": configure}, "sslmode": "verify-full"},
    )
    assert entry["CONN_HEALTH_CHECKS"] is True and entry["NAME"] == "other"
    assert entry["OPTIONS"] == {
        "sslmode": "verify-full",
        "pool": {"max_size": 4, "configure": configure},
    }


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (
            "pool_max_size=ten",
            "Database URL parameter pool_max_size='ten' is invalid: max_size is a whole number "
            "of connections, for example 10.",
        ),
        (
            "pool_max_size=0",
            "Database URL parameter pool_max_size='0' is invalid: max_size must be >= 1 "
            "connections.",
        ),
        (
            "pool_timeout=soon",
            "Database URL parameter pool_timeout='soon' is invalid: timeout is a number of "
            "seconds, for example 30.",
        ),
        (
            "pool_timeout=none",
            "Database URL parameter pool_timeout='none' is invalid: timeout cannot be none",
        ),
        (
            "pool_max_idle=-5",
            "Database URL parameter pool_max_idle='-5' is invalid: max_idle must be > 0 seconds.",
        ),
        ("pool_reset=maybe", "a SQL reset or a callable goes in OPTIONS['pool']['reset']"),
        ("pool_configure=setup", "configure takes a callable, which a URL can't hold"),
        ("pool_maxsize=3", "'pool_maxsize' is not a pool option. Did you mean 'pool_max_size'?"),
        ("max_conns=3", "'max_conns' is neither a pool option (pool_...) nor a libpq"),
        ("max_conns=3", "django_pgpool calls it 'pool_max_size'."),
        ("pool_recycle=300", "django_pgpool calls it 'pool_max_lifetime'."),
        ("sslmod=require", "'sslmod' is neither a pool option (pool_...) nor a libpq connection"),
        ("sslmod=require", "Did you mean 'sslmode'?"),
        ("pool_max_size=2&pool_max_size=3", "'pool_max_size' is given twice"),
        ("pool_min_size=12", "give min_size=12 and max_size=10"),
        ("pool=sometimes", "pool='sometimes' is invalid"),
        ("pool=false&pool_max_size=3", "pool=false and pool_max_size contradict each other"),
        ("isolation_level=snapshot", "isolation_level='snapshot' is invalid: use one of"),
    ],
)
def test_a_bad_parameter_is_refused_naming_the_parameter(query: str, expected: str) -> None:
    assert expected in url_error(f"{URL}?{query}")


def test_conn_max_age_with_pooling_is_refused_when_the_settings_are_built() -> None:
    assert "sets CONN_MAX_AGE=600 while django_pgpool pools" in url_error(URL, CONN_MAX_AGE=600)


def test_a_url_that_is_not_postgresql_or_not_a_url_is_refused() -> None:
    assert "has the scheme mysql://" in url_error("mysql://shop:p%40ss@db/shop")
    assert "port a number" in url_error("postgres://shop:p%40ss@db.internal:port/shop")


def test_dj_database_url_output_adapts_to_the_same_entry() -> None:
    url = (
        f"{URL}?pool_max_size=20&pool_timeout=5&pool_max_lifetime=none&pool_reset=false"
        "&sslmode=require&currentSchema=tenant_7"
    )
    adapted = from_dj_database_url(dj_database_url.parse(url, conn_health_checks=True))
    direct = database_from_url(url)
    assert adapted["ENGINE"] == "django_pgpool"
    assert adapted["OPTIONS"] == direct["OPTIONS"]
    assert adapted["CONN_HEALTH_CHECKS"] is True and adapted["CONN_MAX_AGE"] == 0
    assert {key: adapted[key] for key in ("NAME", "USER", "PASSWORD", "HOST")} == {
        key: direct[key] for key in ("NAME", "USER", "PASSWORD", "HOST")
    }


def test_dj_database_url_output_is_checked_like_a_url() -> None:
    with pytest.raises(ImproperlyConfigured, match="sets CONN_MAX_AGE=600"):
        from_dj_database_url(dj_database_url.parse(URL, conn_max_age=600))
    with pytest.raises(ImproperlyConfigured, match="'pool_max_size' is given 2 times"):
        from_dj_database_url(dj_database_url.parse(f"{URL}?pool_max_size=1&pool_max_size=2"))
    with pytest.raises(ImproperlyConfigured, match=r"ENGINE is 'django\.db\.backends\.sqlite3'"):
        from_dj_database_url(dj_database_url.parse("sqlite:///db.sqlite3"))


def test_a_pool_configured_from_a_url_serves_queries_with_its_settings(
    server: Any, admin: Any, django_db_blocker: Any
) -> None:
    application_name = f"pgpool-url-{uuid.uuid4().hex[:8]}"
    credentials = quote(server.user, safe="")
    if server.password:
        credentials += ":" + quote(server.password, safe="")
    url = (
        f"postgres://{credentials}@{server.host}:{server.port}/postgres"
        f"?pool_min_size=0&pool_max_size=2&pool_timeout=5&application_name={application_name}"
        "&isolation_level=repeatable_read"
    )
    # Not a django_db test, which would refuse ORM queries on an alias that was
    # not in DATABASES when it started; nothing here touches the test database.
    with (
        django_db_blocker.unblock(),
        temporary_alias("from_url", **database_from_url(url, alias="from_url")),
    ):
        with django_pgpool.connection("from_url") as conn, conn.cursor() as cursor:
            cursor.execute("SELECT current_database(), current_setting('application_name')")
            assert cursor.fetchone() == ("postgres", application_name)
        with transaction.atomic(using="from_url"), connections["from_url"].cursor() as cursor:
            cursor.execute("SHOW transaction_isolation")
            assert cursor.fetchone()[0] == "repeatable read"
        connections["from_url"].close()
        stats = django_pgpool.stats()["from_url"]
        assert (stats["pool_min"], stats["pool_max"], stats["requests_num"]) == (0, 2, 2)
        assert django_pgpool.get_pool("from_url").config.timeout == 5.0
        assert backends(admin, application_name=application_name) == stats["pool_size"] >= 1


def test_the_module_is_safe_to_import_in_a_settings_module() -> None:
    # Loading Django's PostgreSQL backend (or psycopg 3) this early would bind
    # the backend to psycopg 3 before django_pgpool could keep it on psycopg2.
    result = run_python(
        "import sys\n"
        "from django_pgpool.url import database_from_url\n"
        "database_from_url('postgres://u@h/db?pool_max_size=3&sslmode=require')\n"
        "print(sorted(m for m in sys.modules if m.startswith(('psycopg.', 'django.db.backends'))"
        " or m == 'psycopg'))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("pool_max_size=²", "pool_max_size='²' is invalid: max_size is a whole number"),
        ("pool_max_size=--5", "pool_max_size='--5' is invalid: max_size is a whole number"),
        ("pool_max_size=%2B-5", "max_size is a whole number of connections, for example 10."),
        ("pool_max_size=１０", "max_size is a whole number of connections"),
        ("pool_max_size=1_0", "max_size is a whole number of connections"),
        ("pool_max_size=300000", "max_size must be <= 262143 connections (PostgreSQL's own"),
        ("pool_max_size=" + "9" * 5000, "max_size must be <= 262143 connections"),
        ("pool_timeout=٣٠", "timeout is a number of seconds, for example 30."),
        ("pool_timeout=nan", "timeout is a number of seconds, for example 30."),
        ("pool_timeout=inf", "timeout is a number of seconds, for example 30."),
        ("pool_timeout=1e400", "timeout must be <= 31536000 seconds (365 days)."),
        ("pool_timeout=9223372036854775807", "timeout must be <= 31536000 seconds (365 days)."),
        ("pool_max_lifetime=31536001", "max_lifetime must be <= 31536000 seconds (365 days) or"),
        ("pool_name=", "name must be a non-empty string."),
    ],
)
def test_a_number_out_of_range_or_not_in_ascii_digits_is_refused(query: str, expected: str) -> None:
    message = url_error(f"{URL}?{query}")
    assert message.startswith("Database URL parameter pool_")
    assert expected in message
    assert len(message) < 300  # a huge value is not repeated in full


def test_numbers_with_a_sign_or_a_fraction_are_read() -> None:
    entry = database_from_url(f"{URL}?pool_max_size=+5&pool_timeout=.5&pool_max_idle=1e3")
    assert entry["OPTIONS"]["pool"] == {"max_size": 5, "timeout": 0.5, "max_idle": 1000.0}


HOSTILE_PASSWORDS = ["?Zk2-secret", "#Zk2-secret", "Zk2/secret", "Zk2?pool_max_size=ten", "a#b?c/d"]


@pytest.mark.parametrize(
    "url",
    [
        *(f"postgres://shop:{password}@db.internal/shop" for password in HOSTILE_PASSWORDS),
        *(
            f"postgres://shop:{password}@db.internal:5432/shop?sslmode=require"
            for password in HOSTILE_PASSWORDS
        ),
        "postgres://shop:Zk2-secret@[::1/shop",
        "postgres://shop:Zk2-secret@::1:5432/shop",
        "postgres://shop:Zk2-secret@db.internal:99999/shop",
        "postgres://shop:Zk2-secret@db.internal:-1/shop",
        "postgres://shop:Zk2-secret@db.internal:54x2/shop",
        "postgres://shop:Zk2-secret@[::1]:port/shop",
        "postgres://sh?op:Zk2-secret@db.internal/shop",
        "postgres://shop:Zk2@secret@db.internal/shop?pool_max_size=ten",
        "postgres://shop:Zk2:secret@db.internal/shop?sslmod=require",
        "postgres:shop:Zk2-secret@db.internal/shop",
        "postgres://shop:Zk2-secret%00@db.internal/shop",
        "postgres://shop:Zk2-secret%00@db.internal/shop?pool=false",
        "mysql://shop:Zk2-secret@db.internal/shop",
    ],
)
def test_no_message_shows_any_part_of_the_password_whatever_the_url(url: str) -> None:
    credentials = url.split("://", 1)[-1] if "://" in url else url.split(":", 1)[1]
    password = credentials.rsplit("@", 1)[0].split(":", 1)[1]
    with pytest.raises(ImproperlyConfigured) as caught:
        database_from_url(url)
    message = str(caught.value)
    pieces = {password[i : i + 4] for i in range(len(password) - 3)} | {unquote(password)}
    assert not {piece for piece in pieces if piece in message}, message


def test_an_unencoded_character_in_the_password_is_named_with_the_fix() -> None:
    message = url_error("postgres://shop:?p@ss@db.internal/shop")
    assert message.startswith("The database URL is not valid: it has an '@' after its host part.")
    assert "urllib.parse.quote(password, safe='')" in message
    # Encoded, the same password works.
    entry = database_from_url(f"postgres://shop:{quote('?p@ss', safe='')}@db.internal/shop")
    assert entry["PASSWORD"] == "?p@ss" and entry["HOST"] == "db.internal"


def test_an_at_sign_in_a_query_value_must_be_encoded_too() -> None:
    assert "an '@' after its host part" in url_error(f"{URL}?application_name=me@shop")
    entry = database_from_url(f"{URL}?application_name=me%40shop")
    assert entry["OPTIONS"]["application_name"] == "me@shop"


def test_a_nul_byte_in_the_password_is_refused_without_showing_it() -> None:
    message = url_error("postgres://shop:p%40ss%00@db.internal/shop")
    assert message.startswith("DATABASES['default']['PASSWORD'] is invalid: it must not contain")


def test_a_boolean_looking_reset_given_in_python_is_refused_like_in_settings() -> None:
    message = url_error(URL, OPTIONS={"pool": {"reset": "false"}})
    assert "['reset'] = 'false' (str) is invalid: reset must be the Python value True" in message
