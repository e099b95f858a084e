"""Keeping embeddings fresh: targets, the trigger-fed queue, workers (alone and concurrently), retries with
backoff, dead letters, pause/resume, and scheduling on pg_cron."""

from __future__ import annotations

import threading

import psycopg
import pytest

from pgtraj.db.install import install

from .test_embed_table import LINE, N, conn, fill  # noqa: F401  (fixtures: 40 trips, deployed model 'm')
from .test_inference import models, register  # noqa: F401
from .test_model import TRIPS


def status(c):
    return c.execute("SELECT pending, retrying, failed, last_run_status FROM pgtraj.embedding_status"
                     " WHERE name = 'trips'").fetchone()


def embedded(c):
    return c.execute("SELECT count(*) FROM trips WHERE embedding IS NOT NULL").fetchone()[0]


def test_backfill_then_triggers_keep_the_column_fresh(conn):
    assert conn.execute("SELECT pgtraj.create_embedding_target('trips', 'trips', 'geom', 'embedding', 'm')"
                        ).fetchone() == (N,)
    assert status(conn) == (N, 0, 0, None)
    conn.execute("CALL pgtraj.process_queue('trips')")
    assert embedded(conn) == N and status(conn) == (0, 0, 0, "succeeded")
    same = conn.execute("SELECT bool_and(embedding <-> pgtraj.embed(geom, 'm') < 1e-5) FROM trips").fetchone()[0]
    assert same
    t = TRIPS[50]
    conn.execute(f"INSERT INTO trips (id, geom) VALUES (1000, {LINE})", [t.lon.tolist(), t.lat.tolist(), t.t.tolist()])
    conn.execute("UPDATE trips SET geom = (SELECT geom FROM trips WHERE id = 1) WHERE id = 2")  # a changed trip
    conn.execute("UPDATE trips SET embedding = embedding WHERE id = 3")                          # not a trip change
    assert sorted(k for (k,) in conn.execute("SELECT key FROM pgtraj.embedding_queue")) == ["1000", "2"]
    conn.execute("UPDATE trips SET geom = NULL WHERE id = 4")      # no trajectory any more: no embedding either
    conn.execute("INSERT INTO trips (id, geom) SELECT 1001, geom FROM trips WHERE id = 5")
    conn.execute("DELETE FROM trips WHERE id = 1001")              # gone before a worker saw it
    conn.execute("CALL pgtraj.process_queue()")
    row2, row1 = (conn.execute("SELECT embedding::text FROM trips WHERE id = %s", [i]).fetchone()[0] for i in (2, 1))
    assert row2 == row1 and conn.execute("SELECT embedding FROM trips WHERE id = 4").fetchone() == (None,)
    assert embedded(conn) == N and status(conn)[:3] == (0, 0, 0)
    conn.execute("SELECT pgtraj.drop_embedding_target('trips')")
    conn.execute("INSERT INTO trips (id, geom) SELECT 1002, geom FROM trips WHERE id = 5")
    assert conn.execute("SELECT count(*) FROM pgtraj.embedding_queue").fetchone() == (0,)


def test_a_spacetime_target_keeps_a_wider_column_fresh(conn):
    """aspect => 'spacetime': backfill and triggers fill the column with what pgtraj.embed(geom, model,
    'spacetime') gives; a column of the route's width is refused when the target is made."""
    conn.execute("ALTER TABLE trips ADD COLUMN st vector(64)")
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT pgtraj.create_embedding_target('st', 'trips', 'geom', 'embedding', 'm',"
                     " aspect => 'spacetime')")
    assert err.value.sqlstate == "42804"
    assert conn.execute("SELECT pgtraj.create_embedding_target('st', 'trips', 'geom', 'st', 'm',"
                        " aspect => 'spacetime')").fetchone() == (N,)
    t = TRIPS[50]
    conn.execute(f"INSERT INTO trips (id, geom) VALUES (1000, {LINE})", [t.lon.tolist(), t.lat.tolist(), t.t.tolist()])
    conn.execute("CALL pgtraj.process_queue('st')")
    same = conn.execute("SELECT count(*), bool_and(st <-> pgtraj.embed(geom, 'm', 'spacetime') < 1e-5) FROM trips"
                        " WHERE st IS NOT NULL").fetchone()
    assert same == (N + 1, True)
    assert conn.execute("SELECT aspect FROM pgtraj.embedding_targets WHERE name = 'st'").fetchone() == ("spacetime",)


def test_failing_rows_back_off_then_become_dead_letters(conn):
    conn.execute("SELECT pgtraj.create_embedding_target('trips', 'trips', 'geom', 'embedding', 'm',"
                 " max_attempts => 2)")
    conn.execute("UPDATE trips SET geom = ST_SetSRID(ST_MakeLine(ST_MakePointM(116.3, 95, 1e9),"
                 " ST_MakePointM(116.4, 95, 1e9 + 60)), 4326) WHERE id = 7")
    conn.execute("CALL pgtraj.process_queue('trips')")
    assert embedded(conn) == N - 1
    attempts, wait, error = conn.execute("SELECT attempts, next_attempt_at - now(), last_error FROM"
                                         " pgtraj.embedding_queue WHERE key = '7'").fetchone()
    assert attempts == 1 and wait.total_seconds() > 5 and "latitude 95" in error
    conn.execute("CALL pgtraj.process_queue('trips')")  # not due yet: nothing happens
    assert conn.execute("SELECT attempts FROM pgtraj.embedding_queue WHERE key = '7'").fetchone() == (1,)
    conn.execute("UPDATE pgtraj.embedding_queue SET next_attempt_at = now() - interval '1 s'")
    conn.execute("CALL pgtraj.process_queue('trips')")
    assert conn.execute("SELECT count(*) FROM pgtraj.embedding_queue").fetchone() == (0,)
    assert conn.execute("SELECT key, attempts FROM pgtraj.embedding_errors").fetchone() == ("7", 2)
    assert status(conn)[:3] == (0, 0, 1)


def test_concurrent_workers_share_the_queue(conn, db):
    conn.execute("INSERT INTO trips SELECT id + 1000, geom FROM trips")
    conn.execute("SELECT pgtraj.create_embedding_target('trips', 'trips', 'geom', 'embedding', 'm',"
                 " batch_size => 4)")
    errors = []

    def work():
        try:
            with psycopg.connect(db, autocommit=True) as c:
                c.execute("CALL pgtraj.process_queue('trips')")
        except psycopg.Error as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not errors and embedded(conn) == 2 * N
    runs = conn.execute("SELECT sum((progress ->> 'embedded')::int), count(*) FROM pgtraj.jobs WHERE kind = 'refresh'"
                        ).fetchone()
    assert runs == (2 * N, 3)  # every row embedded exactly once across the three workers


def test_pause_and_resume(conn):
    conn.execute("SELECT pgtraj.create_embedding_target('trips', 'trips', 'geom', 'embedding', 'm')")
    conn.execute("SELECT pgtraj.pause_embedding('trips')")
    conn.execute("CALL pgtraj.process_queue()")
    assert embedded(conn) == 0 and status(conn)[0] == N
    conn.execute("SELECT pgtraj.resume_embedding('trips')")
    conn.execute("CALL pgtraj.process_queue()")
    assert embedded(conn) == N


@pytest.mark.parametrize("call, sqlstate", [
    ("SELECT pgtraj.create_embedding_target('Bad Name', 'trips', 'geom', 'embedding', 'm')", "23514"),
    ("SELECT pgtraj.create_embedding_target('trips', 'trips', 'geom', 'embedding', 'nope')", "42704"),
    ("SELECT pgtraj.create_embedding_target('trips', 'trips', 'id', 'embedding', 'm')", "42804"),
    ("CALL pgtraj.process_queue('nope')", "42704"),
    ("SELECT pgtraj.pause_embedding('nope')", "42704"),
    ("SELECT pgtraj.schedule_refresh('nope')", "42704"),
])
def test_refusals(conn, call, sqlstate):
    with pytest.raises(psycopg.Error) as err:
        conn.execute(call)
    assert err.value.sqlstate == sqlstate, str(err.value)
    assert conn.execute("SELECT count(*) FROM pgtraj.embedding_targets").fetchone() == (0,)


def test_schedule_needs_pg_cron_here(conn):
    conn.execute("SELECT pgtraj.create_embedding_target('trips', 'trips', 'geom', 'embedding', 'm')")
    with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
        conn.execute("SELECT pgtraj.schedule_refresh('trips')")  # test databases are not cron.database_name
    assert "cron.database_name" in err.value.diag.message_hint


def test_schedule_on_pg_cron(cluster, models):  # noqa: F811
    """In the database pg_cron serves: the job exists with the worker call, and that call does the work."""
    url = cluster.url()
    install(url, python_path=cluster.python_path, log=lambda m: None)
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS cron_trips")
        c.execute("CREATE TABLE cron_trips (id int PRIMARY KEY, geom geometry(LineStringM, 4326), embedding vector)")
        fill(c, "cron_trips", n=5)
        register(c, models[0], name="cronm")
        c.execute("SELECT pgtraj.create_embedding_target('cron_trips', 'cron_trips', 'geom', 'embedding', 'cronm')")
        try:
            job = c.execute("SELECT pgtraj.schedule_refresh('cron_trips', '*/5 * * * *')").fetchone()[0]
            schedule, command, database = c.execute(
                "SELECT schedule, command, database FROM cron.job WHERE jobid = %s", [job]).fetchone()
            assert schedule == "*/5 * * * *" and database == cluster.dbname
            c.execute(command)  # what pg_cron will run
            assert c.execute("SELECT count(embedding) FROM cron_trips").fetchone() == (5,)
            assert c.execute("SELECT pgtraj.unschedule_refresh('cron_trips')").fetchone() == (True,)
            assert c.execute("SELECT count(*) FROM cron.job WHERE jobid = %s", [job]).fetchone() == (0,)
        finally:
            c.execute("SELECT pgtraj.unschedule_refresh('cron_trips')")
            c.execute("SELECT pgtraj.drop_embedding_target('cron_trips')")
            c.execute("DROP TABLE cron_trips")


def test_bad_rows_of_any_kind_back_off_then_become_dead_letters(conn):
    from .test_embed_table import BAD_ROWS, spoil

    spoil(conn)
    conn.execute("SELECT pgtraj.create_embedding_target('trips', 'trips', 'geom', 'embedding', 'm', max_attempts => 2,"
                 " batch_size => 8)")
    conn.execute("CALL pgtraj.process_queue('trips')")
    assert embedded(conn) == N - len(BAD_ROWS)
    retrying = dict(conn.execute("SELECT key::int, attempts FROM pgtraj.embedding_queue").fetchall())
    assert retrying == {k: 1 for k in BAD_ROWS}  # every one counted, none stuck
    conn.execute("UPDATE pgtraj.embedding_queue SET next_attempt_at = now() - interval '1 s'")
    conn.execute("CALL pgtraj.process_queue('trips')")
    assert conn.execute("SELECT count(*) FROM pgtraj.embedding_queue").fetchone() == (0,)
    dead = {int(k): (a, e) for k, a, e in conn.execute("SELECT key, attempts, error FROM pgtraj.embedding_errors")}
    assert sorted(dead) == sorted(BAD_ROWS)
    assert all(a == 2 and BAD_ROWS[k][1] in e for k, (a, e) in dead.items()), dead
    assert status(conn)[:3] == (0, 0, len(BAD_ROWS))


def test_a_version_of_another_width_is_not_deployed_under_a_target(conn):
    """A target fills a vector(32) column from the deployed version of 'm': deploying a version of
    another width would make every row fail, so deploy refuses it and says what to do first."""
    from pgtraj.db import registry

    from .test_inference import register
    from .test_model import make_model

    conn.execute("SELECT pgtraj.create_embedding_target('trips', 'trips', 'geom', 'embedding', 'm')")
    wide = register(conn, make_model(seed=4, d_model=48, d_ff=96).eval(), deploy=False)
    with pytest.raises(psycopg.errors.DatatypeMismatch) as err:
        registry.deploy(conn, "m", wide.version)
    assert "embeds in 48 dimensions" in err.value.diag.message_primary and "vector(48)" in err.value.diag.message_hint
    assert conn.execute("SELECT version FROM pgtraj.deployments WHERE name = 'm'").fetchone() == (1,)
    conn.execute("SELECT pgtraj.drop_embedding_target('trips')")  # without the target, nothing depends on the width
    assert registry.deploy(conn, "m", wide.version)["version"] == wide.version
