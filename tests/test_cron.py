"""Scheduled work really runs: pg_cron itself fires a refresh scheduled by a pgtraj_user and a retraining
scheduled by a pgtraj_admin, each job running as the role that scheduled it, in the database pg_cron
serves on the cluster `pgtraj db start` makes (background workers, no password-less login needed).

pg_cron 1.4 schedules by the minute, so this waits up to three minutes for the jobs to fire and finish."""

from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest
from psycopg import sql

from pgtraj.db.install import install

from .test_embed_table import fill
from .test_inference import models, register  # noqa: F401  (models: the module's fixture)
from .test_sql_training import TINY, make_table

WAIT_S = 240


def wait_for(what: str, check, timeout: float = WAIT_S, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"pg_cron did not {what} within {timeout} s"
        time.sleep(every)


@pytest.fixture
def cron_db(cluster, login_role):
    """The database pg_cron serves, with pgtraj installed, a user and an admin role, cleaned up after."""
    url = cluster.url()
    install(url, python_path=cluster.python_path, log=lambda m: None)
    user, admin = login_role("pgtraj_user"), login_role("pgtraj_admin")
    with psycopg.connect(url, autocommit=True) as su:
        su.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(user.role),
                                                                      sql.Identifier(user.role)))
        su.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(admin.role),
                                                                      sql.Identifier(admin.role)))
    try:
        yield url, user, admin
    finally:
        with psycopg.connect(url, autocommit=True) as su:
            for role in (user.role, admin.role):
                for (jobid,) in su.execute("SELECT jobid FROM cron.job WHERE username = %s", [role]).fetchall():
                    su.execute("SELECT cron.unschedule(%s)", [jobid])
                su.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(role)))


def test_pg_cron_runs_refresh_and_training_as_the_roles_that_scheduled_them(cron_db, models):
    url, user, admin = cron_db
    u, a = user.role, admin.role
    with psycopg.connect(url, autocommit=True) as su:
        register(su, models[0], name=f"cron-{u}")
    with psycopg.connect(user(url), autocommit=True) as c:
        c.execute(f"SET search_path = {u}, public")
        c.execute("CREATE TABLE trips (id int PRIMARY KEY, geom geometry(LineStringM, 4326), embedding vector(32))")
        c.execute("SELECT pgtraj.create_embedding_target(%s, 'trips', 'geom', 'embedding', %s)",
                  [f"cron_{u}", f"cron-{u}"])
        fill(c, "trips", n=12)  # after the target: the triggers queue every row
        assert c.execute("SELECT pending FROM pgtraj.embedding_status").fetchone() == (12,)
        refresh = c.execute("SELECT pgtraj.schedule_refresh(%s, '* * * * *')", [f"cron_{u}"]).fetchone()[0]
    with psycopg.connect(admin(url), autocommit=True) as c:
        c.execute(f"SET search_path = {a}, public")
        make_table(c, "trips", n=30)
        train = c.execute("SELECT pgtraj.schedule_training(%s, '* * * * *', %s, 'next_cell', %s)",
                          [f"cronm-{a}", f"{a}.trips", json.dumps(TINY)]).fetchone()[0]
    with psycopg.connect(url, autocommit=True) as su:
        jobs = dict(su.execute("SELECT jobid, username FROM cron.job WHERE jobid IN (%s, %s)", [refresh, train]))
        assert jobs == {refresh: u, train: a}  # each job runs as the role that scheduled it
        wait_for("embed the queued rows", lambda: su.execute(
            f"SELECT count(embedding) = 12 FROM {u}.trips").fetchone()[0])
        run = wait_for("register a retrained model", lambda: su.execute(
            "SELECT started_by, status, outcome FROM pgtraj.training_status WHERE model_name = %s AND status <>"
            " 'running' ORDER BY id LIMIT 1", [f"cronm-{a}"]).fetchone())
        assert run == (a, "succeeded", "registered v1, deployed"), run
        assert su.execute("SELECT created_by FROM pgtraj.model_registry WHERE name = %s", [f"cronm-{a}"]
                          ).fetchone() == (a,)
        refreshed = su.execute("SELECT status, created_by FROM pgtraj.jobs WHERE kind = 'refresh'"
                               " AND args ->> 'target' = %s ORDER BY id LIMIT 1", [f"cron_{u}"]).fetchone()
        assert refreshed == ("succeeded", u)
    with psycopg.connect(user(url), autocommit=True) as c:
        assert c.execute("SELECT pgtraj.unschedule_refresh(%s)", [f"cron_{u}"]).fetchone() == (True,)
    with psycopg.connect(admin(url), autocommit=True) as c:
        assert c.execute("SELECT pgtraj.unschedule_training(%s)", [f"cronm-{a}"]).fetchone() == (True,)
    with psycopg.connect(url, autocommit=True) as su:
        assert su.execute("SELECT count(*) FROM cron.job WHERE jobid IN (%s, %s)", [refresh, train]).fetchone() == (0,)


def test_scheduling_is_for_roles_that_may_do_the_work(cron_db, models):
    url, user, admin = cron_db
    u = user.role
    with psycopg.connect(url, autocommit=True) as su:
        register(su, models[0], name=f"cron-{u}")
        su.execute("CREATE TABLE IF NOT EXISTS public.cron_secret (id int PRIMARY KEY, geom geometry(LineStringM, 4326),"
                   " embedding vector(32))")
        su.execute("SELECT pgtraj.create_embedding_target(%s, 'public.cron_secret', 'geom', 'embedding', %s)",
                   [f"sec_{u}", f"cron-{u}"])
    try:
        with psycopg.connect(user(url), autocommit=True) as c:
            for call, sqlstate in (("SELECT pgtraj.schedule_refresh(%s)", "42501"),  # a table it may not write
                                   ("SELECT pgtraj.schedule_training('x', '* * * * *', %s)", "42501"),
                                   ("SELECT cron.schedule('* * * * *', %s)", "42501")):  # pg_cron itself stays closed
                with pytest.raises(psycopg.Error) as err:
                    c.execute(call, [f"sec_{u}"])
                assert err.value.sqlstate == sqlstate, (call, err.value)
            # nor can it remove another role's job of the same name
            with psycopg.connect(url, autocommit=True) as su:
                su.execute("SELECT pgtraj.schedule_refresh(%s, '0 0 1 1 *')", [f"sec_{u}"])
            assert c.execute("SELECT pgtraj.unschedule_refresh(%s)", [f"sec_{u}"]).fetchone() == (False,)
    finally:
        with psycopg.connect(url, autocommit=True) as su:
            su.execute("SELECT pgtraj.unschedule_refresh(%s)", [f"sec_{u}"])
            su.execute("SELECT pgtraj.drop_embedding_target(%s)", [f"sec_{u}"])
            su.execute("DROP TABLE public.cron_secret")


def test_embed_table_with_workers_fills_the_column_with_pg_cron_sessions_and_survives_a_killed_one(cron_db, models,
                                                                                                    login_role):
    """workers => 2: the caller's backend and a pg_cron session running as the caller take key-range parts;
    the session, killed in the middle of a part, loses nothing (its part is taken over from its cursor), and
    the sessions are unscheduled when the job ends. pg_cron 1.4 starts the session at the next minute.
    Another role can neither read the job's parts (they name the table's keys), take one, write one, plan
    them nor schedule sessions for the job."""
    url, user, _ = cron_db
    u = user.role
    with psycopg.connect(url, autocommit=True) as su:
        register(su, models[0], name=f"cron-{u}")
    with psycopg.connect(user(url), autocommit=True) as c:
        c.execute(f"SET search_path = {u}, public")
        c.execute("CREATE TABLE trips (id int PRIMARY KEY, geom geometry(LineStringM, 4326), embedding vector(32))")
        fill(c, "trips", n=80)
        for step in (100, 200, 400, 800):  # 1,280 rows: 8 parts of 160 rows, 80 batches each
            c.execute(f"INSERT INTO trips SELECT id + {step}, geom FROM trips WHERE id <= {step}")
        assert c.execute("SELECT count(*) FROM trips").fetchone() == (1280,)
        coordinator = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        said, errors = [], []
        c.add_notice_handler(lambda d: said.append(d.message_primary))

        def run():
            try:
                c.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', %s, batch_size => 2, workers => 2)",
                          [f"cron-{u}"])
            except psycopg.Error as exc:
                errors.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        with psycopg.connect(url, autocommit=True) as su:
            # a part of slot 1 held by another backend, with a committed batch: the pg_cron session at work
            session = wait_for("start a session that embeds a part", lambda: worker.is_alive() and su.execute(
                "SELECT p.pid, a.usename FROM pgtraj.job_parts p JOIN pg_stat_activity a ON a.pid = p.pid"
                " WHERE p.slot = 1 AND p.status = 'running' AND p.batches > 0 AND p.pid <> %s", [coordinator]
            ).fetchone() or not worker.is_alive() and ("coordinator ended first", None), every=0.02)
            assert session[1] == u, (session, errors)  # runs as the caller, not as a superuser
            su.execute("SELECT pg_terminate_backend(%s)", [session[0]])
        worker.join(WAIT_S)
        assert not worker.is_alive() and not errors, errors
    with psycopg.connect(url, autocommit=True) as su:
        job = su.execute("SELECT id, status, done, total FROM pgtraj.job_status WHERE created_by = %s"
                         " AND kind = 'embed_table' ORDER BY id DESC LIMIT 1", [u]).fetchone()
        assert job[1:] == ("succeeded", 1280, 1280)
        same = su.execute(f"SELECT count(*), bool_and(embedding <-> pgtraj.embed(geom, %s) < 1e-5) FROM {u}.trips"
                          " WHERE embedding_model IS NOT NULL", [f"cron-{u}"]).fetchone()
        assert same == (1280, True)
        parts = su.execute("SELECT count(*), bool_and(status = 'done'), sum(embedded) FROM pgtraj.job_parts"
                           " WHERE job = %s", [job[0]]).fetchone()
        assert parts == (8, True, 1280)
        assert su.execute("SELECT count(*) FROM cron.job WHERE jobname LIKE %s", [f"pgtraj-embed-{job[0]}-%"]
                          ).fetchone() == (0,)
    assert any("2 of 2 backends" in m for m in said), said[-3:]
    with psycopg.connect(user(url), autocommit=True) as c:
        assert c.execute("SELECT open_parts, failed_parts, sessions FROM pgtraj._parts_progress(%s)", [job[0]]
                         ).fetchone() == (0, 0, 2)
    with psycopg.connect(login_role("pgtraj_user")(url), autocommit=True) as c:
        j = job[0]
        for call in ("SELECT * FROM pgtraj.job_parts", f"SELECT * FROM pgtraj._part_claim({j}, 1)",
                     f"SELECT pgtraj._part_update({j}, 0, '1', 1, 0)", f"SELECT * FROM pgtraj._parts_progress({j})",
                     f"SELECT pgtraj._schedule_parts({j})", f"SELECT pgtraj._parts_plan({j}, '{{}}', 2)"):
            with pytest.raises(psycopg.Error) as err:
                c.execute(call)
            assert err.value.sqlstate == "42501", (call, err.value)
