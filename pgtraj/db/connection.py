"""Connecting to the database pgtraj works in: an explicit DSN, ``PGTRAJ_DSN``, or the local database."""

from __future__ import annotations

import os

import psycopg

from pgtraj.core.errors import PgtrajConnectionError

DSN_ENV = "PGTRAJ_DSN"


def resolve_dsn(dsn: str | None = None, data_dir: str | None = None) -> str:
    """The DSN to use: ``dsn`` if given, else ``$PGTRAJ_DSN``, else the local database's URL."""
    if dsn:
        return dsn
    if os.environ.get(DSN_ENV):
        return os.environ[DSN_ENV]
    from pgtraj.db.cluster import (
        LocalCluster,  # deferred: only needed for the embedded default
    )

    cluster = LocalCluster(data_dir)
    if not cluster.is_running():
        raise PgtrajConnectionError(
            f"no --dsn given, ${DSN_ENV} is not set, and the local database in {cluster.home} is not running",
            hint="start it with `pgtraj db start`, or pass --dsn postgresql://user@host:port/dbname",
        )
    return cluster.url()


def connect(dsn: str, *, autocommit: bool = False, application_name: str = "pgtraj") -> psycopg.Connection:
    """Open a connection, turning driver errors into a message that says what to check."""
    try:
        return psycopg.connect(dsn, autocommit=autocommit, application_name=application_name, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise PgtrajConnectionError(
            f"cannot connect to {_redact(dsn)}: {str(exc).strip()}",
            hint="check host, port, database name and credentials; `pgtraj db status` shows the local database",
        ) from exc
    except psycopg.ProgrammingError as exc:  # malformed DSN
        raise PgtrajConnectionError(
            f"invalid connection string {_redact(dsn)}: {exc}",
            hint="use a URL such as postgresql://user@localhost:5432/dbname or 'host=... dbname=...'",
        ) from exc


def _redact(dsn: str) -> str:
    """The DSN without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    if "password" in info:
        info["password"] = "***"
    return psycopg.conninfo.make_conninfo(**info)
