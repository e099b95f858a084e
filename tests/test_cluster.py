"""The embedded local database (`pgtraj db ...`): a real cluster per test where the behaviour needs one."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

from pgtraj.core.errors import DataDirectoryError, PortInUseError
from pgtraj.db.cluster import LocalCluster, free_port

from .conftest import CACHE, FAST, new_home

quiet = {"log": lambda m: None}


@pytest.fixture
def home():
    h = new_home()
    yield h
    c = LocalCluster(h, runtime_venv=CACHE / "runtime-venv")
    c.stop()
    shutil.rmtree(h, ignore_errors=True)


def make(home, **kw) -> LocalCluster:
    return LocalCluster(home, runtime_venv=CACHE / "runtime-venv", settings=FAST, **kw)


def test_start_stop_restart_keeps_data_and_port(home):
    c = make(home)
    url = c.start(**quiet)
    assert c.is_running() and url.startswith("postgresql://postgres:")
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 42 AS x")
        preload = conn.execute("SHOW shared_preload_libraries").fetchone()[0]
        assert "pg_cron" in preload and "postgis-3" in preload
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
    port = c.port
    assert c.start(**quiet) == url  # idempotent while running
    assert c.stop() is True and not c.is_running()
    assert c.stop() is False
    c.start(**quiet)
    assert c.port == port
    with psycopg.connect(c.url()) as conn:
        assert conn.execute("SELECT x FROM kept").fetchone()[0] == 42


def test_password_is_required_and_private(home):
    c = make(home)
    c.start(**quiet)
    assert (c.home / "password").stat().st_mode & 0o077 == 0
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(f"postgresql://postgres:wrong@127.0.0.1:{c.port}/postgres")


def test_explicit_port_taken_is_refused(home):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PortInUseError) as err:
            make(home).start(port=port, **quiet)
    assert f"port {port}" in err.value.message and "--port" in err.value.hint


def test_remembered_port_taken_moves_to_a_free_one(home):
    c = make(home)
    c.start(**quiet)
    old = c.port
    c.stop()
    messages = []
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", old))
        busy.listen()
        c.start(log=messages.append)
    assert c.port != old and any(f"port {old} is taken" in m for m in messages)
    with psycopg.connect(c.url()) as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_data_dir_not_writable():
    with tempfile.NamedTemporaryFile() as f:  # a file where a directory should be: unwritable even for root
        with pytest.raises(DataDirectoryError) as err:
            make(Path(f.name) / "db").start(**quiet)
    assert "is not writable" in err.value.message and "--data-dir" in err.value.hint


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")
def test_data_dir_the_server_user_cannot_reach():
    private = Path(tempfile.mkdtemp())  # mode 0700, owned by root: 'postgres' cannot enter it
    try:
        with pytest.raises(DataDirectoryError) as err:
            make(private / "db").start(**quiet)
        assert "not reachable by the server user 'postgres'" in err.value.message
    finally:
        shutil.rmtree(private)


def run_cli(*args, home) -> subprocess.CompletedProcess:
    env = {**os.environ, "PGTRAJ_HOME": str(home)}
    env.pop("PGTRAJ_DSN", None)
    return subprocess.run([sys.executable, "-m", "pgtraj", *args], capture_output=True, text=True, env=env)


def test_cli_db_lifecycle_and_embedded_default(home):
    # build the venv through the shared cache first, then point the CLI's home at it
    make(home).start(**quiet)
    make(home).stop()
    shutil.rmtree(home / "runtime-venv", ignore_errors=True)
    (home / "runtime-venv").symlink_to(CACHE / "runtime-venv")
    assert run_cli("db", "status", home=home).returncode == 3
    out = run_cli("db", "url", home=home)
    assert out.returncode == 3 and "pgtraj db start" in out.stderr
    out = run_cli("install", home=home)
    assert out.returncode == 1 and "not running" in out.stderr and "pgtraj db start" in out.stderr
    assert run_cli("db", "start", home=home).returncode == 0
    status = json.loads(run_cli("db", "status", home=home).stdout)
    assert status["running"] and status["port"]
    url = run_cli("db", "url", home=home).stdout.strip()
    assert url == status["url"]
    out = run_cli("install", home=home)  # no --dsn: the local database and its runtime environment
    assert out.returncode == 0, out.stderr
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT pgtraj.runtime_info() ->> 'numpy'").fetchone()[0]
    assert run_cli("db", "stop", home=home).returncode == 0
    assert run_cli("db", "status", home=home).returncode == 3


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_listen_beyond_loopback_requires_passwords(home):
    c = make(home, listen="*")
    c.start(**quiet)
    hba = subprocess.run(["cat", str(c.pgdata / "pg_hba.conf")], capture_output=True, text=True).stdout
    assert hba.count("host all all all scram-sha-256") == 1
    c.stop()
    c.start(**quiet)  # restarting does not add the line twice
    hba = subprocess.run(["cat", str(c.pgdata / "pg_hba.conf")], capture_output=True, text=True).stdout
    assert hba.count("host all all all scram-sha-256") == 1
    with psycopg.connect(c.url()) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == "*"
