"""`pgtraj install` against real databases: success, re-runs, upgrades, and every way it can be refused."""

from __future__ import annotations

import difflib
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pgtraj import __version__
from pgtraj.core.errors import (
    MigrationError,
    MissingExtensionError,
    NotSuperuserError,
    PgtrajConnectionError,
    RuntimeImportError,
)
from pgtraj.db.cluster import free_port
from pgtraj.db.install import (
    REQUIREMENTS,
    Migration,
    Requirement,
    apply_migrations,
    create_extensions,
    install,
    load_migrations,
)

quiet = {"log": lambda m: None}


def schema_snapshot(dsn: str) -> str:
    """The pgtraj schema as pg_dump sees it (definitions only), for comparing installs."""
    out = subprocess.run(["pg_dump", "--schema-only", "--no-owner", "-n", "pgtraj", dsn],
                         check=True, capture_output=True, text=True).stdout
    # \\restrict lines carry a random key per dump (pg_dump 15.14+)
    return "\n".join(l for l in out.splitlines() if not l.startswith(("--", "\\restrict", "\\unrestrict")))


def test_fresh_install_creates_everything(empty_db, cluster):
    logs = []
    result = install(empty_db, python_path=cluster.python_path, log=logs.append)
    assert result.applied == [f"{m.version}_{m.name}" for m in load_migrations()]
    assert set(result.extensions) >= {"postgis", "plpython3u", "vector", "mobilitydb", "h3", "h3_postgis"}
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT pgtraj.version()").fetchone()[0] == __version__
        info = conn.execute("SELECT pgtraj.runtime_info()").fetchone()[0]
        assert info["pgtraj"] == __version__ and info["torch_loaded"] is False
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'pgtraj'").fetchall()}
        assert tables == {"installation", "schema_migrations", "model_registry", "model_artifacts",
                          "deployment_log", "training_runs", "jobs", "embedding_errors", "embedding_targets",
                          "embedding_queue", "job_parts"}
    assert any(f"pgtraj {__version__} installed" in line for line in logs)


def test_rerun_is_a_no_op(db, cluster):
    before = schema_snapshot(db)
    result = install(db, python_path=cluster.python_path, **quiet)
    assert result.applied == []
    after = schema_snapshot(db)
    assert after == before, "\n".join(list(difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm=""))[:60])


def test_upgrade_from_every_earlier_schema_version(databases, cluster, db):
    """Install stopped after each migration prefix (an earlier release), with data in it, then upgrade:
    the result must equal a fresh install and keep the data."""
    migrations = load_migrations()
    fresh = schema_snapshot(db)
    for k in range(1, len(migrations) + 1):
        name = databases.create()
        try:
            dsn = databases.url(name)
            # an earlier release's schema: its migrations only (its sql/ files went with it)
            with psycopg.connect(dsn) as conn, conn.cursor() as cur:
                create_extensions(cur)
                apply_migrations(cur, migrations[:k], log=lambda m: None)
                cur.execute("INSERT INTO pgtraj.jobs (kind) VALUES ('marker')")
                named_by_text = 3 <= k and migrations[k - 1].version < "0005"
                if named_by_text:  # refresh targets existed: named by text, one of them for a table dropped since
                    cur.execute("CREATE TABLE t (id int PRIMARY KEY, geom geometry, embedding vector)")
                    cur.execute("INSERT INTO pgtraj.embedding_targets (name, table_name, traj_column, embedding_column,"
                                " model) VALUES ('kept', 'public.t', 'geom', 'embedding', 'm'),"
                                " ('gone', 'public.nope', 'geom', 'embedding', 'm')")
            install(dsn, python_path=cluster.python_path, **quiet)
            assert schema_snapshot(dsn) == fresh, f"upgrade from migration {migrations[k - 1].version} differs"
            with psycopg.connect(dsn) as conn:
                assert conn.execute("SELECT count(*) FROM pgtraj.jobs WHERE kind = 'marker'").fetchone()[0] == 1
                if named_by_text:
                    assert conn.execute("SELECT name, table_name::text, key_column FROM pgtraj.embedding_targets"
                                        ).fetchall() == [("kept", "t", "id")]
        finally:
            databases.drop(name)


def test_wrong_dsn_port_gives_connection_error():
    with pytest.raises(PgtrajConnectionError) as err:
        install(f"postgresql://postgres@127.0.0.1:{free_port()}/nope", **quiet)
    assert "cannot connect" in str(err.value) and err.value.hint


def test_wrong_password_is_redacted(cluster):
    url = cluster.url("postgres").replace(cluster.url().split(":")[2].split("@")[0], "wrong-pw")
    with pytest.raises(PgtrajConnectionError) as err:
        install(url, **quiet)
    assert "password authentication failed" in str(err.value)
    assert "wrong-pw" not in str(err.value)


def test_malformed_dsn():
    with pytest.raises(PgtrajConnectionError) as err:
        install("host=127.0.0.1 port=notaport", **quiet)
    assert err.value.hint


def test_non_superuser_is_refused(empty_db, login_role):
    dsn = login_role()(empty_db)
    with pytest.raises(NotSuperuserError) as err:
        install(dsn, **quiet)
    assert "not a superuser" in err.value.message and "pgtraj_user" in err.value.hint
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT to_regnamespace('pgtraj')").fetchone()[0] is None


def test_missing_extension_is_named_with_a_fix(empty_db, cluster):
    reqs = REQUIREMENTS + (Requirement("pgtraj_no_such_extension", why="this test"),)
    with pytest.raises(MissingExtensionError) as err:
        install(empty_db, python_path=cluster.python_path, requirements=reqs, **quiet)
    assert "pgtraj_no_such_extension is not installed on the database server" in err.value.message
    assert "install-debian.sh" in err.value.hint
    with psycopg.connect(empty_db) as conn:  # nothing created, not even the extensions before it
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'vector'").fetchone()[0] == 0


def test_too_old_extension_version(empty_db, cluster):
    reqs = tuple(Requirement(r.extension, "99.0", r.optional, r.why) if r.extension == "vector" else r
                 for r in REQUIREMENTS)
    with pytest.raises(MissingExtensionError) as err:
        install(empty_db, python_path=cluster.python_path, requirements=reqs, **quiet)
    with psycopg.connect(empty_db) as c:
        default = c.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'").fetchone()[0]
    assert f"vector {default} is available; pgtraj needs 99.0 or newer" in err.value.message


def test_pg_cron_outside_its_database_is_a_note_not_an_error(empty_db, cluster):
    result = install(empty_db, python_path=cluster.python_path, **quiet)
    assert "pg_cron" not in result.extensions
    assert any("cron.database_name is 'pgtraj_test'" in n for n in result.notes)


def test_pg_cron_is_created_in_its_database(cluster):
    result = install(cluster.url(), python_path=cluster.python_path, **quiet)
    assert result.extensions["pg_cron"].startswith("1.4")


def test_plpython_without_the_packages(empty_db):
    # the server's own Python has no onnxruntime: exactly what an unprepared database looks like
    with pytest.raises(RuntimeImportError) as err:
        install(empty_db, python_path=None, **quiet)
    assert "cannot import" in err.value.message and "onnxruntime" in err.value.message
    assert "pgtraj runtime-env" in err.value.hint
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT to_regnamespace('pgtraj')").fetchone()[0] is None


def test_plpython_path_that_does_not_exist(empty_db, tmp_path):
    with pytest.raises(RuntimeImportError) as err:
        install(empty_db, python_path=str(tmp_path / "nowhere"), **quiet)
    assert "nowhere" in err.value.message


def test_failing_migration_leaves_nothing_half_applied(empty_db, db, cluster):
    broken = load_migrations() + [Migration("9999", "broken", "CREATE TABLE pgtraj.half(); SELECT 1/0;")]
    for dsn in (empty_db, db):  # a fresh install and an upgrade
        before = schema_snapshot(dsn) if dsn == db else None
        with pytest.raises(psycopg.errors.DivisionByZero):
            install(dsn, python_path=cluster.python_path, migrations=broken, **quiet)
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT to_regclass('pgtraj.half')").fetchone()[0] is None
        if before is None:
            with psycopg.connect(dsn) as conn:
                assert conn.execute("SELECT to_regnamespace('pgtraj')").fetchone()[0] is None
        else:
            assert schema_snapshot(dsn) == before


def test_install_killed_halfway_leaves_nothing(empty_db, cluster):
    """Make install wait halfway (extensions created, schema not yet), kill its backend there, and check
    that none of the earlier steps survived; then install again and succeed."""
    with psycopg.connect(empty_db) as blocker:
        blocker.execute("CREATE SCHEMA pgtraj")  # uncommitted: install's CREATE SCHEMA waits on it
        proc = subprocess.Popen([sys.executable, "-m", "pgtraj", "install", "--dsn", empty_db,
                                 "--python-path", cluster.python_path],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with psycopg.connect(cluster.url("postgres"), autocommit=True) as watcher:
            for _ in range(600):
                row = watcher.execute("""SELECT pid FROM pg_stat_activity WHERE application_name = 'pgtraj install'
                                          AND wait_event_type = 'Lock'""").fetchone()
                if row:
                    break
                time.sleep(0.1)
            assert row, "install never reached the schema creation step"
            watcher.execute("SELECT pg_terminate_backend(%s)", [row[0]])
        _, stderr = proc.communicate(timeout=60)
        blocker.rollback()
    assert proc.returncode == 1 and "error" in stderr
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT to_regnamespace('pgtraj')").fetchone()[0] is None
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'mobilitydb'").fetchone()[0] == 0
    assert install(empty_db, python_path=cluster.python_path, **quiet).applied


def test_concurrent_installs_serialise(empty_db, cluster):
    results, errors = [], []

    def run():
        try:
            results.append(install(empty_db, python_path=cluster.python_path, **quiet))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(len(r.applied) for r in results) == [0, 0, 0, len(load_migrations())]
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT count(*) FROM pgtraj.schema_migrations").fetchone()[0] == len(load_migrations())


def test_edited_migration_is_refused(db, cluster):
    edited = [Migration(m.version, m.name, m.sql + "\n-- edited") for m in load_migrations()]
    with pytest.raises(MigrationError) as err:
        install(db, python_path=cluster.python_path, migrations=edited, **quiet)
    assert "was edited after it was applied" in err.value.message


def test_database_from_a_newer_pgtraj_is_refused(db, cluster):
    with psycopg.connect(db) as conn:
        conn.execute("INSERT INTO pgtraj.schema_migrations VALUES ('9000', 'from_the_future', 'x', '9.9.9')")
    with pytest.raises(MigrationError) as err:
        install(db, python_path=cluster.python_path, **quiet)
    assert "9000_from_the_future" in err.value.message and "upgrade this client" in err.value.hint


def test_registry_survives_pg_dump_and_restore(db, databases, cluster):
    from pgtraj.db import registry

    from .graphs import TOKENIZER, encoder

    payload = encoder("dumped")
    with psycopg.connect(db) as conn:
        mv = registry.register(conn, "dumped", objective="test", tokenizer=TOKENIZER,
                               artifacts={"encoder": payload}, metrics={"acc": 0.5}, primary_metric="acc")
        registry.deploy(conn, "dumped", mv.version)
    target = databases.create()
    try:
        dump = subprocess.run(["pg_dump", "-Fc", db], check=True, capture_output=True).stdout
        subprocess.run(["pg_restore", "--exit-on-error", "-d", databases.url(target)], input=dump, check=True,
                       capture_output=True)
        with psycopg.connect(databases.url(target)) as conn:
            restored = registry.load(conn, "dumped")
            assert restored.artifacts["encoder"] == payload and restored.metrics == {"acc": 0.5}
            assert conn.execute("SELECT pgtraj.runtime_info() ->> 'pgtraj'").fetchone()[0] == __version__
    finally:
        databases.drop(target)


def test_cli_install_and_models_on_a_dsn(db, cluster):
    env_cmd = [sys.executable, "-m", "pgtraj"]
    out = subprocess.run(env_cmd + ["install", "--dsn", db, "--python-path", cluster.python_path],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(env_cmd + ["models", "--dsn", db], capture_output=True, text=True)
    assert out.returncode == 0 and "no models registered" in out.stderr
    out = subprocess.run(env_cmd + ["deploy", "--dsn", db, "nosuch"], capture_output=True, text=True)
    assert out.returncode == 1 and 'no model named "nosuch"' in out.stderr


def test_package_data_dirs_exist():
    root = Path(__file__).resolve().parent.parent
    assert sorted(p.name for p in (root / "migrations").glob("*.sql")) == \
        [f"{m.version}_{m.name}.sql" for m in load_migrations()]


def test_the_runtime_path_is_recorded_where_the_server_found_it(db, cluster):
    """Without --python-path, install records the directory PL/Python imported pgtraj from, so that a
    restart from another environment still finds it."""
    from pgtraj.db.install import probe_runtime

    with psycopg.connect(db) as conn, conn.cursor() as cur:
        assert probe_runtime(cur, cluster.python_path)["found_at"] == cluster.python_path
    install(db, **quiet)  # no python_path: keeps what is recorded
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT python_path FROM pgtraj.installation").fetchone() == (cluster.python_path,)


def test_install_warns_when_pg_cron_cannot_run_jobs(cluster):
    """pg_cron over libpq (no background workers) fails every job on a password-only server: install says
    so, and what to set."""
    from pgtraj.db.cluster import LocalCluster

    from .conftest import CACHE, FAST, new_home

    other = LocalCluster(new_home(), runtime_venv=CACHE / "runtime-venv", dbname="cronless",
                         settings={**FAST, "cron.use_background_workers": "off"})
    try:
        url = other.start(log=lambda m: None)
        notes = install(url, python_path=other.python_path, **quiet).notes
        assert any("cron.use_background_workers = off" in n and "restart" in n for n in notes), notes
        assert not install(cluster.url(), python_path=cluster.python_path, **quiet).notes  # the suite's cluster
    finally:
        other.stop()
        subprocess.run(["rm", "-rf", str(other.home)], check=False)


def test_pgvector_is_updated_in_place_and_its_hnsw_index_keeps_working(empty_db, cluster):
    """A database on pgvector 0.8.0 (what pgtraj 0.3 installed) is brought to the server's newer pgvector by
    `pgtraj install` (ALTER EXTENSION vector UPDATE: 0.8.1-0.8.4 fix HNSW corruption during vacuum); its
    vectors and HNSW index serve the same answers before and after, and a second install changes nothing."""
    with psycopg.connect(empty_db, autocommit=True) as c:
        default = c.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'").fetchone()[0]
        if default == "0.8.0":
            pytest.skip("this server has no pgvector newer than 0.8.0 (docker/install-debian.sh builds 0.8.6)")
        c.execute("CREATE EXTENSION vector VERSION '0.8.0'")
        c.execute("CREATE TABLE v (id int PRIMARY KEY, e vector(3))")
        c.execute("INSERT INTO v SELECT i, ARRAY[cos(i), sin(i), i % 7]::vector FROM generate_series(1, 500) i")
        c.execute("CREATE INDEX ON v USING hnsw (e vector_cosine_ops)")
        c.execute("SET enable_seqscan = off")
        query = "SELECT id FROM v ORDER BY e <=> '[1, 0.5, 3]' LIMIT 10"
        before = c.execute(query).fetchall()
    notes = []
    install(empty_db, python_path=cluster.python_path, log=notes.append)
    assert f"note: extension vector updated from 0.8.0 to {default}" in notes, notes
    with psycopg.connect(empty_db, autocommit=True) as c:
        assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone() == (default,)
        c.execute("SET enable_seqscan = off")
        assert c.execute(query).fetchall() == before
        c.execute("VACUUM v")
        assert c.execute(query).fetchall() == before
    notes.clear()
    install(empty_db, python_path=cluster.python_path, log=notes.append)
    assert not any("updated" in n for n in notes)
