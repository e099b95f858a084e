"""What must hold when things go wrong around pgtraj, measured on the real cluster: many clients while models
are redeployed, a backend killed with SIGKILL and the whole server stopped with an immediate shutdown in the
middle of batch embedding and of the refresh queue, and a streaming replica serving inference."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pgtraj.db.cluster import PG_BINDIR, free_port, shutil_chown

from .test_embed_table import N, fill
from .test_inference import models, register  # noqa: F401  (models: the module's fixture)


def wait_until(check, timeout: float = 120, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
            if got:
                return got
        except psycopg.OperationalError:  # the server is restarting
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def reconnect(dsn: str) -> psycopg.Connection:
    """A connection once the server accepts them again (after a crash or a restart)."""
    return wait_until(lambda: psycopg.connect(dsn, autocommit=True), what="the server to accept connections")


@pytest.fixture
def trips(db, models):  # noqa: F811
    with psycopg.connect(db, autocommit=True) as c:
        register(c, models[0])
        c.execute("CREATE TABLE trips (id int PRIMARY KEY, geom geometry(LineStringM, 4326), embedding vector(32))")
        fill(c)
        for offset in (1000, 2000, 3000):
            c.execute("INSERT INTO trips SELECT id + %s, geom FROM trips WHERE id < 1000", [offset])
    return db


def test_many_clients_while_models_are_redeployed(trips, models):  # noqa: F811
    """8 clients x 500 calls while the deployed version flips between two: no errors, and every call
    answers with one version's embedding, never a mixture."""
    q = "SELECT pgtraj.embed(geom, %s)::text FROM trips WHERE id = 3"
    with psycopg.connect(trips, autocommit=True) as c:
        register(c, models[1], deploy=False)
        versions = {c.execute(q, ["m@1"]).fetchone()[0]: 1, c.execute(q, ["m@2"]).fetchone()[0]: 2}
    assert len(versions) == 2
    errors, seen, done = [], [], threading.Event()

    def client():
        try:
            with psycopg.connect(trips, autocommit=True) as c:
                seen.extend(versions.get(c.execute(q, ["m"]).fetchone()[0], 0) for _ in range(500))
        except psycopg.Error as exc:
            errors.append(exc)

    def redeploy():
        with psycopg.connect(trips, autocommit=True) as c:
            while not done.is_set():
                for v in ("2", "1"):
                    c.execute("SELECT * FROM pgtraj.deploy('m', %s)", [v])
                    time.sleep(0.02)

    clients = [threading.Thread(target=client) for _ in range(8)]
    flipper = threading.Thread(target=redeploy)
    flipper.start()
    for t in clients:
        t.start()
    for t in clients:
        t.join(600)
    done.set()
    flipper.join(60)
    assert not errors and len(seen) == 4000
    assert 0 not in seen and {1, 2} <= set(seen)  # both versions served, nothing else


def kill_during(conn_dsn: str, call: str, enough: str, stop) -> None:
    """Run ``call`` in its own session, wait until ``enough`` holds, then ``stop`` it (given its pid)."""
    pid, errors = [], []

    def run():
        try:
            with psycopg.connect(conn_dsn, autocommit=True) as c:
                pid.append(c.execute("SELECT pg_backend_pid()").fetchone()[0])
                c.execute(call)
        except psycopg.Error as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    with psycopg.connect(conn_dsn, autocommit=True) as watcher:
        wait_until(lambda: pid and watcher.execute(enough).fetchone()[0], what=enough)
    stop(pid[0])
    worker.join(120)
    assert errors, "the call finished before it was stopped"


def check_complete(dsn: str) -> None:
    """Every row embedded exactly as pgtraj.embed embeds it, none left, nothing recorded as failed."""
    with psycopg.connect(dsn, autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM trips WHERE embedding IS NULL").fetchone() == (0,)
        assert c.execute("SELECT bool_and(embedding <-> pgtraj.embed(geom, 'm') < 1e-5) FROM trips").fetchone() == (True,)
        assert c.execute("SELECT count(*) FROM pgtraj.embedding_errors").fetchone() == (0,)


def crash(how: str, cluster):
    """What stops a backend mid-work: SIGKILL to it (the postmaster then restarts every backend, crash
    recovery), or an immediate shutdown of the whole server, started again at once."""
    def stop(pid: int) -> None:
        if how == "kill -9":
            os.kill(pid, signal.SIGKILL)
        else:
            cluster.as_server([str(PG_BINDIR / "pg_ctl"), "-D", str(cluster.pgdata), "stop", "-m", "immediate", "-w"])
            cluster.start(log=lambda m: None)
    return stop


@pytest.mark.parametrize("stop", ["kill -9", "immediate shutdown"])
def test_a_crash_during_embed_table_loses_nothing(trips, cluster, stop):
    kill_during(trips, "CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm', batch_size => 2)",
                "SELECT count(embedding) >= 6 FROM trips", crash(stop, cluster))
    with reconnect(trips) as c:
        kept = c.execute("SELECT count(embedding) FROM trips").fetchone()[0]
        assert 6 <= kept < 4 * N
        assert c.execute("SELECT status FROM pgtraj.job_status").fetchone() == ("interrupted",)
        c.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm', batch_size => 50)")
        assert c.execute("SELECT total FROM pgtraj.jobs ORDER BY id DESC LIMIT 1").fetchone() == (4 * N - kept,)
    check_complete(trips)


@pytest.mark.parametrize("stop", ["kill -9", "immediate shutdown"])
def test_a_crash_during_the_queue_loses_nothing_and_embeds_nothing_twice(trips, cluster, stop):
    with psycopg.connect(trips, autocommit=True) as c:
        c.execute("SELECT pgtraj.create_embedding_target('trips', 'trips', 'geom', 'embedding', 'm', batch_size => 2)")
    kill_during(trips, "CALL pgtraj.process_queue('trips')", "SELECT count(embedding) >= 6 FROM trips",
                crash(stop, cluster))
    with reconnect(trips) as c:
        left = c.execute("SELECT count(*) FROM pgtraj.embedding_queue").fetchone()[0]
        assert left == c.execute("SELECT count(*) FROM trips WHERE embedding IS NULL").fetchone()[0] > 0
        c.execute("CALL pgtraj.process_queue('trips')")
        assert c.execute("SELECT count(*) FROM pgtraj.embedding_queue").fetchone() == (0,)
        # what the interrupted run committed and what the second embedded add up to every row, once
        runs = c.execute("SELECT s.status, (j.progress ->> 'embedded')::int FROM pgtraj.job_status s"
                         " JOIN pgtraj.jobs j USING (id) ORDER BY id").fetchall()
        assert [s for s, _ in runs] == ["interrupted", "succeeded"] and sum(n for _, n in runs) == 4 * N, runs
    check_complete(trips)


@pytest.fixture
def standby(cluster, trips):
    """A streaming replica of the test cluster (pg_basebackup -R), started on a free port, without the
    primary's model files: it has to fill its own cache from the replicated registry."""
    home = Path(tempfile.mkdtemp(prefix="pgtraj-standby-"))
    home.chmod(0o755)
    pgdata = home / "pgdata"
    pgdata.mkdir(mode=0o700)
    if os.geteuid() == 0:  # the server (and so pg_basebackup) runs as 'postgres'
        shutil_chown(pgdata, cluster.server_user)
    cluster.as_server([str(PG_BINDIR / "pg_basebackup"), "-D", str(pgdata), "-R", "-X", "stream", "-c", "fast",
                       "-d", cluster.url("postgres")])
    cluster.as_server(["rm", "-rf", str(pgdata / "pgtraj_cache")])
    port = free_port()
    cluster.as_server([str(PG_BINDIR / "pg_ctl"), "-D", str(pgdata), "-o", f"-p {port}", "-l",
                       str(pgdata / "server.log"), "-w", "start"])
    url = trips.replace(f":{cluster.port}/", f":{port}/")
    try:
        yield url, pgdata
    finally:
        cluster.as_server([str(PG_BINDIR / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop"], check=False)
        subprocess.run(["rm", "-rf", str(home)], check=False)


def caught_up(primary: psycopg.Connection, replica: psycopg.Connection) -> bool:
    lsn = primary.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    return replica.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [lsn]).fetchone()[0]


def test_a_hot_standby_serves_every_read_only_function(trips, standby, models, cluster):  # noqa: F811
    url, pgdata = standby
    reads = {
        "embed": "SELECT pgtraj.embed(geom, 'm')::text FROM trips WHERE id = 3",
        "embed_many": "SELECT pgtraj.embed(array_agg(geom ORDER BY id), 'm')::text FROM trips WHERE id < 6",
        "similarity": "SELECT round(pgtraj.similarity(a.geom, b.geom, 'm')::numeric, 5) FROM trips a, trips b"
                      " WHERE a.id = 1 AND b.id = 2",
        "predict_next": "SELECT array_agg(cell::text ORDER BY rank) FROM pgtraj.predict_next("
                        "(SELECT geom FROM trips WHERE id = 4), 'm')",
        "predict_path": "SELECT ST_AsText(pgtraj.predict_path(geom, 'm', steps => 3)) FROM trips WHERE id = 4",
        "score": "SELECT round(pgtraj.score(geom, 'm')::numeric, 5) FROM trips WHERE id = 5",
        "tokenize": "SELECT count(*) FROM pgtraj.tokenize((SELECT geom FROM trips WHERE id = 6),"
                    " (SELECT tokenizer FROM pgtraj.model_registry LIMIT 1))",
        "similar": "SELECT array_agg(id ORDER BY distance, id) FROM pgtraj.similar('trips', 'embedding', row_id => 1, k => 5)",
        "version": "SELECT pgtraj.version()",
    }
    with psycopg.connect(trips, autocommit=True) as p:
        p.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm')")
        p.execute("SELECT pgtraj.create_hnsw_index('trips', 'embedding')")
        want = {k: p.execute(q).fetchone()[0] for k, q in reads.items()}
        primary_cache = Path(p.execute("SELECT current_setting('data_directory')").fetchone()[0]) / "pgtraj_cache"
        before = sorted(f.name for f in primary_cache.iterdir())
        with psycopg.connect(url, autocommit=True) as s:
            wait_until(lambda: caught_up(p, s), what="the standby to replay")
            assert s.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
            got = {k: s.execute(q).fetchone()[0] for k, q in reads.items()}
            assert got == want
            assert s.execute("SELECT pgtraj.warmup('m') ->> 'graphs'").fetchone()[0]
            # its model files went to its own data directory, none to the primary's
            assert {f.suffix for f in (pgdata / "pgtraj_cache").iterdir() if f.is_file()} == {".onnx", ".meta"}
            assert sorted(f.name for f in primary_cache.iterdir()) == before
            for write in ("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm')",
                          "SELECT * FROM pgtraj.deploy('m', '1')",
                          "SELECT pgtraj.create_embedding_target('t', 'trips', 'geom', 'embedding', 'm')"):
                with pytest.raises(psycopg.Error) as err:
                    s.execute(write)
                assert err.value.sqlstate == "25006" and "standby" in str(err.value), (write, err.value)
            # a redeploy on the primary is what the standby serves once replayed
            register(p, models[1])
            v2 = p.execute(reads["embed"]).fetchone()[0]
            assert v2 != want["embed"]
            wait_until(lambda: caught_up(p, s), what="the standby to replay the redeploy")
            assert s.execute(reads["embed"]).fetchone()[0] == v2
