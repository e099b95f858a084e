"""The suite runs against a real PostgreSQL 15 cluster with PostGIS, pgvector, MobilityDB, h3-pg, pg_cron and
PL/Python, started here (through pgtraj's own LocalCluster) on a free port and removed at the end.

Each test gets a fresh database: `db` is a copy of a template with pgtraj installed, `empty_db` has nothing.
The PL/Python environment is cached in $PGTRAJ_TEST_CACHE (default /tmp/pgtraj-test-cache-<uid>).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pgtraj.db.cluster import LocalCluster
from pgtraj.db.install import install

CACHE = Path(os.environ.get("PGTRAJ_TEST_CACHE", f"/tmp/pgtraj-test-cache-{os.geteuid()}"))
FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}  # throwaway cluster


def new_home() -> Path:
    home = Path(tempfile.mkdtemp(prefix="pgtraj-test-"))
    home.chmod(0o755)  # the server runs as 'postgres' when the suite runs as root
    return home


@pytest.fixture(scope="session")
def cluster():
    c = LocalCluster(new_home(), runtime_venv=CACHE / "runtime-venv", dbname="pgtraj_test", settings=FAST,
                     training=True)
    c.start(log=lambda m: None)
    yield c
    c.stop()
    shutil.rmtree(c.home, ignore_errors=True)


class Databases:
    """Creates and drops databases in the test cluster."""

    def __init__(self, cluster: LocalCluster):
        self.cluster = cluster

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(self.cluster.url("postgres"), autocommit=True)

    def create(self, template: str = "template0") -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))
        return name

    def drop(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def url(self, name: str) -> str:
        return self.cluster.url(name)


@pytest.fixture(scope="session")
def databases(cluster):
    return Databases(cluster)


@pytest.fixture(scope="session")
def installed_template(databases, cluster):
    name = databases.create()
    install(databases.url(name), python_path=cluster.python_path, log=lambda m: None)
    yield name
    databases.drop(name)


@pytest.fixture
def db(databases, installed_template):
    """DSN of a fresh database with pgtraj installed."""
    name = databases.create(installed_template)
    yield databases.url(name)
    databases.drop(name)


@pytest.fixture
def empty_db(databases):
    """DSN of a fresh database with nothing in it."""
    name = databases.create()
    yield databases.url(name)
    databases.drop(name)


@pytest.fixture
def login_role(cluster):
    """Creates LOGIN roles (non-superuser) with a password; returns a factory name -> DSN builder."""
    created = []

    def make(*member_of: str):
        name = f"r_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(cluster.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'secret'").format(sql.Identifier(name)))
            for role in member_of:
                conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(name)))
        created.append(name)

        def dsn_for(dsn: str) -> str:
            return psycopg.conninfo.make_conninfo(dsn, user=name, password="secret")

        dsn_for.role = name
        return dsn_for

    yield make
    with psycopg.connect(cluster.url("postgres"), autocommit=True) as conn:
        for name in created:
            try:
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
            except psycopg.errors.DependentObjectsStillRemain:  # it owns or was granted something somewhere
                for (dbname,) in conn.execute("SELECT datname FROM pg_database WHERE datallowconn").fetchall():
                    with psycopg.connect(cluster.url(dbname), autocommit=True) as other:
                        other.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
