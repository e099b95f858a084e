"""`pgtraj db start --workers N`: a Citus coordinator and N workers on this host, as a user would run them:
every node started on its own port with the same settings and PL/Python environment, the workers registered,
a table with LINESTRING M and vector columns distributed over them, and status / stop covering every node."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from pgtraj.db.cluster import PG_BINDIR, LocalCluster

from .conftest import CACHE, FAST, new_home

SHARE = subprocess.run([str(PG_BINDIR / "pg_config"), "--sharedir"], capture_output=True, text=True).stdout.strip()
needs_citus = pytest.mark.skipif(not (Path(SHARE) / "extension" / "citus.control").exists(),
                                 reason="Citus is not installed here (docker/install-debian.sh builds it)")


@needs_citus
def test_a_coordinator_with_two_workers_distributes_a_trajectory_table():
    home = new_home()
    env = {**os.environ, "PGTRAJ_HOME": str(home)}
    env.pop("PGTRAJ_DSN", None)
    try:
        coordinator = LocalCluster(home, runtime_venv=CACHE / "runtime-venv", settings=FAST)
        coordinator.start(workers=2, log=lambda m: None)
        with psycopg.connect(coordinator.url(), autocommit=True) as c:
            nodes = c.execute("SELECT nodeport FROM pg_dist_node WHERE groupid > 0 ORDER BY 1").fetchall()
            assert sorted(p for (p,) in nodes) == sorted(w.port for w in coordinator.workers())
            c.execute("CREATE EXTENSION IF NOT EXISTS postgis")
            c.execute("CREATE EXTENSION IF NOT EXISTS vector")
            c.execute("CREATE TABLE trips (id bigint PRIMARY KEY, geom geometry(LineStringM, 4326), e vector(3))")
            c.execute("SELECT create_distributed_table('trips', 'id')")
            c.execute("INSERT INTO trips SELECT i, ST_SetSRID(ST_MakeLine(ST_MakePointM(116.3 + i * 1e-3, 39.9, i),"
                      " ST_MakePointM(116.31 + i * 1e-3, 39.91, i + 60)), 4326), ARRAY[i, 1, 0]::vector"
                      " FROM generate_series(1, 200) i")
            per_node = c.execute("SELECT count(DISTINCT nodeport) FROM citus_shards WHERE table_name = 'trips'::regclass"
                                 ).fetchone()[0]
            assert per_node == 2
            assert c.execute("SELECT count(*), sum(ST_NPoints(geom)) FROM trips").fetchone() == (200, 400)
            assert c.execute("SELECT id FROM trips ORDER BY e <-> '[7, 1, 0]' LIMIT 1").fetchone() == (7,)
        out = subprocess.run([sys.executable, "-m", "pgtraj", "db", "status"], capture_output=True, text=True,
                             env=env)
        status = json.loads(out.stdout)
        assert status["running"] and [w["running"] for w in status["workers"]] == [True, True]
        # a restart brings every node back, registered (ports may change: stale entries go)
        coordinator.stop()
        assert not any(w.is_running() for w in coordinator.workers())
        coordinator.start(log=lambda m: None)
        with psycopg.connect(coordinator.url(), autocommit=True) as c:
            assert c.execute("SELECT count(*) FROM trips").fetchone() == (200,)
    finally:
        LocalCluster(home).stop()
        shutil.rmtree(home, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# pgtraj installed on the coordinator, serving a distributed table


@pytest.fixture(scope="module")
def citus():
    """A coordinator with two workers, pgtraj installed through the coordinator, a tiny model registered and
    deployed there, and a trajectory table distributed over the workers (12 trips, a few per shard)."""
    from pgtraj.db.install import install

    from .test_inference import LINE, TRIPS, register, trained

    home = new_home()
    coordinator = LocalCluster(home, runtime_venv=CACHE / "runtime-venv", settings=FAST, training=True)
    try:
        coordinator.start(workers=2, log=lambda m: None)
        install(coordinator.url(), python_path=coordinator.python_path, log=lambda m: None)
        model = trained(1)
        with psycopg.connect(coordinator.url(), autocommit=True) as c:
            register(c, model)
            c.execute("CREATE TABLE trips (id int PRIMARY KEY, geom geometry(LineStringM, 4326), e vector(32))")
            c.execute("SELECT create_distributed_table('trips', 'id', shard_count => 8)")
            for t in TRIPS[:12]:
                c.execute(f"INSERT INTO trips (id, geom) SELECT %s, {LINE}",  # Citus: no subquery in VALUES
                          [t.id, t.lon.tolist(), t.lat.tolist(), t.t.tolist()])
        yield coordinator, model
    finally:
        LocalCluster(home).stop()
        shutil.rmtree(home, ignore_errors=True)


def on_each_worker(coordinator: LocalCluster, query: str, params=()) -> list:
    out = []
    for w in coordinator.workers():
        with psycopg.connect(w.url(), autocommit=True) as c:
            out.append(c.execute(query, params).fetchall())
    return out


@needs_citus
def test_install_makes_the_registry_reference_tables_and_every_node_serves_it(citus):
    coordinator, _ = citus
    with psycopg.connect(coordinator.url(), autocommit=True) as c:
        kinds = dict(c.execute("SELECT t::text, pgtraj._citus_kind(t) FROM unnest(ARRAY['pgtraj.model_registry',"
                               " 'pgtraj.model_artifacts', 'pgtraj.deployment_log', 'pgtraj.jobs']::regclass[]) t"))
        assert kinds == {"pgtraj.model_registry": "reference", "pgtraj.model_artifacts": "reference",
                         "pgtraj.deployment_log": "reference", "pgtraj.jobs": None}
        # every function but those returning rows of the coordinator's own tables (the refresh queue's
        # _target, the job bookkeeping's _job_of)
        functions = c.execute("SELECT count(*) FROM pg_proc WHERE pronamespace = 'pgtraj'::regnamespace"
                              " AND proname NOT IN ('_target', '_job_of')").fetchone()[0]
        deployed = c.execute("SELECT model_id FROM pgtraj.deployments WHERE name = 'm'").fetchone()
        # a second install changes nothing and is refused nowhere
        install_again = __import__("pgtraj.db.install", fromlist=["install"]).install
        assert install_again(coordinator.url(), log=lambda m: None).applied == []
    # every worker has pgtraj's functions and reads the registry locally: the same deployment
    assert on_each_worker(coordinator, "SELECT count(*) FROM pg_proc WHERE pronamespace = 'pgtraj'::regnamespace") \
        == [[(functions,)]] * 2
    assert on_each_worker(coordinator, "SELECT model_id FROM pgtraj.deployments WHERE name = 'm'") == [[deployed]] * 2
    # pgtraj_service logs in to the nodes only with the password pg_dist_authinfo holds
    assert on_each_worker(coordinator, "SELECT count(*) FROM pg_dist_authinfo WHERE rolename = 'pgtraj_service'") \
        == [[(1,)]] * 2


@needs_citus
def test_install_names_the_worker_that_lacks_an_extension_or_is_down(citus):
    from pgtraj.core.errors import DatabaseSetupError, MissingExtensionError
    from pgtraj.db.install import REQUIREMENTS, Requirement, install

    coordinator, _ = citus
    w = coordinator.workers()[1]
    missing = (*REQUIREMENTS, Requirement("pgtraj_no_such_extension", why="this test"))
    with pytest.raises(MissingExtensionError) as err:
        install(coordinator.url(), requirements=missing, log=lambda m: None)
    assert err.value.message.startswith(tuple(f"Citus worker 127.0.0.1:{n.port} lacks extension pgtraj_no_such_extension"
                                              for n in coordinator.workers()))
    w.stop()
    try:
        with pytest.raises(DatabaseSetupError) as err:
            install(coordinator.url(), log=lambda m: None)
        assert f"Citus worker 127.0.0.1:{w.port} cannot be reached" in err.value.message and err.value.hint
    finally:
        coordinator.start(log=lambda m: None)


@needs_citus
def test_a_deploy_on_the_coordinator_is_seen_by_every_worker(citus):
    from .test_inference import register, trained

    coordinator, _ = citus
    with psycopg.connect(coordinator.url(), autocommit=True) as c:
        v2 = register(c, trained(2), name="m2")
        c.execute("SELECT * FROM pgtraj.deploy('m2', version => '1')")
    assert on_each_worker(coordinator, "SELECT version FROM pgtraj.deployments WHERE name = 'm2'") == \
        [[(v2.version,)]] * 2


@needs_citus
def test_inference_in_queries_over_a_distributed_table_runs_on_the_workers(citus):
    import numpy as np

    from .test_inference import TRIPS, client_embed, vec

    coordinator, model = citus
    with psycopg.connect(coordinator.url(), autocommit=True) as c:
        plan = "\n".join(r for (r,) in c.execute("EXPLAIN (VERBOSE) SELECT id, pgtraj.embed(geom, 'm') FROM trips"))
        assert "Task Count: 8" in plan and "pgtraj.embed(geom" in plan.split("Task", 2)[-1]  # inside the tasks
        rows = c.execute("SELECT id, pgtraj.embed(geom, 'm')::text FROM trips ORDER BY id").fetchall()
        want = client_embed(model, sorted(TRIPS[:12], key=lambda t: t.id))
        got = np.stack([vec(e) for _, e in rows])
        assert np.abs(got - want).max() < 1e-4
        nxt = c.execute("SELECT id, count(*) FROM trips, pgtraj.predict_next(geom, 'm', k => 3) GROUP BY id").fetchall()
        assert len(nxt) == 12 and {n for _, n in nxt} == {3}
        # the coordinator itself loaded no model: the work was done where the shards are
        assert c.execute("SELECT pgtraj.runtime_info() -> 'cache' ->> 'sessions'").fetchone()[0] == "0"
        with pytest.raises(psycopg.errors.FeatureNotSupported) as err:  # n backends are for one server's table
            c.execute("CALL pgtraj.embed_table('trips', 'geom', 'e', 'm', workers => 2)")
        assert "every Citus worker" in err.value.diag.message_primary


@needs_citus
def test_embed_table_on_a_distributed_table_embeds_on_the_workers_and_survives_a_node_down(citus):
    import numpy as np

    from .test_inference import TRIPS, client_embed, vec

    coordinator, model = citus
    url = coordinator.url()
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("UPDATE trips SET e = NULL")
        # one row no model can read: recorded, the rest of its batch kept
        c.execute("INSERT INTO trips (id, geom) VALUES (-1, ST_SetSRID(ST_MakeLine(ST_MakePointM(116.3, 39.9,"
                  " 1e12), ST_MakePointM(116.31, 39.91, 1e12 + 60)), 4326))")
        c.execute("CALL pgtraj.embed_table('trips', 'geom', 'e', 'm', batch_size => 2)")
        assert c.execute("SELECT pgtraj.runtime_info() -> 'cache' ->> 'sessions'").fetchone()[0] == "0"
        job = c.execute("SELECT status, done, total, failed FROM pgtraj.job_status ORDER BY id DESC LIMIT 1").fetchone()
        assert job == ("succeeded", 13, 13, 1)
        assert c.execute("SELECT key, sqlstate FROM pgtraj.embedding_errors").fetchall() == [("-1", "22023")]
        rows = c.execute("SELECT id, e::text FROM trips WHERE id >= 0 ORDER BY id").fetchall()
        want = client_embed(model, sorted(TRIPS[:12], key=lambda t: t.id))
        assert np.abs(np.stack([vec(e) for _, e in rows]) - want).max() < 1e-4
        # a worker down: the other node's shards are embedded and kept, the job fails naming the node
        c.execute("UPDATE trips SET e = NULL")
        w = coordinator.workers()[1]
        # (computed here: Citus plans a join of the shards' view with the table as a query on each worker)
        shards = {s for (s,) in c.execute("SELECT shardid FROM citus_shards WHERE table_name = 'trips'::regclass"
                                          " AND nodeport = %s", [w.port])}
        on_w = {i for i, s in c.execute("SELECT id, get_shard_id_for_distribution_column('trips', id) FROM trips")
                if s in shards and i >= 0}
        assert on_w and len(on_w) < 13
    w.stop()
    try:
        with psycopg.connect(url, autocommit=True) as c:
            with pytest.raises(psycopg.Error) as err:
                c.execute("CALL pgtraj.embed_table('trips', 'geom', 'e', 'm', batch_size => 2)")
            assert err.value.sqlstate == "08006" and f"127.0.0.1:{w.port}" in err.value.diag.message_primary
            assert c.execute("SELECT status FROM pgtraj.job_status ORDER BY id DESC LIMIT 1").fetchone() == ("failed",)
    finally:
        coordinator.start(log=lambda m: None)
    with psycopg.connect(coordinator.url(), autocommit=True) as c:
        kept = {i for (i,) in c.execute("SELECT id FROM trips WHERE e IS NOT NULL")}
        assert kept == {i for (i,) in c.execute("SELECT id FROM trips WHERE id >= 0")} - on_w
        c.execute("CALL pgtraj.embed_table('trips', 'geom', 'e', 'm', batch_size => 2)")
        job = c.execute("SELECT status, total FROM pgtraj.job_status ORDER BY id DESC LIMIT 1").fetchone()
        assert job == ("succeeded", len(on_w) + 1)  # only what was missing, and the bad row again
        assert c.execute("SELECT count(*) FROM trips WHERE e IS NULL").fetchone() == (1,)


@needs_citus
def test_similar_on_a_distributed_table_merges_the_shards_top_k(citus):
    coordinator, _ = citus
    with psycopg.connect(coordinator.url(), autocommit=True) as c:
        c.execute("CALL pgtraj.embed_table('trips', 'geom', 'e', 'm')")
        c.execute("SELECT pgtraj.create_hnsw_index('trips', 'e')")
        assert on_each_worker(coordinator, "SELECT count(*) > 0 FROM pg_indexes WHERE indexname LIKE 'trips_e_hnsw%%'") \
            == [[(True,)]] * 2
        query = c.execute("SELECT geom FROM trips WHERE id = %s", [TRIPS_ID := 3]).fetchone()[0]
        exact = [str(i) for (i,) in c.execute("SELECT id FROM trips WHERE e IS NOT NULL"
                                              " ORDER BY e <=> pgtraj.embed(%s::geometry, 'm') LIMIT 5", [query])]
        found = [k for k, _ in c.execute("SELECT * FROM pgtraj.similar('trips', 'e', %s::geometry, 'm', k => 5)",
                                         [query])]
        assert found == exact and found[0] == str(TRIPS_ID)
        # ef_search reaches the shards' searches on the workers (Citus propagates SET LOCAL only)
        with c.transaction():
            c.execute("SELECT * FROM pgtraj.similar('trips', 'e', %s::geometry, 'm', k => 5, ef_search => 77)",
                      [query])
            assert c.execute("SELECT DISTINCT current_setting('hnsw.ef_search') FROM trips").fetchall() == [("77",)]


@needs_citus
def test_an_embedding_target_keeps_a_distributed_table_fresh_on_the_workers(citus):
    """create_embedding_target on a distributed table: a trigger on the shards clears the embedding of a row
    whose trajectory changed, and process_queue embeds every row without a current embedding on the
    workers (the coordinator loads no model); the target's status, a bad row and drop work as elsewhere."""
    coordinator, _ = citus
    with psycopg.connect(coordinator.url(), autocommit=True) as c:
        c.execute("DELETE FROM trips WHERE id < 0")  # the unreadable row of the embed_table test
        c.execute("DELETE FROM pgtraj.embedding_errors")
        c.execute("UPDATE trips SET e = NULL")
        n = c.execute("SELECT count(*) FROM trips WHERE geom IS NOT NULL").fetchone()[0]
        assert c.execute("SELECT pgtraj.create_embedding_target('fresh', 'trips', 'geom', 'e', 'm')").fetchone() == (n,)
        c.execute("CALL pgtraj.process_queue('fresh')")
        assert c.execute("SELECT count(*) FROM trips WHERE e IS NULL AND geom IS NOT NULL").fetchone() == (0,)
        assert c.execute("SELECT pgtraj.runtime_info() -> 'cache' ->> 'sessions'").fetchone()[0] == "0"
        # a changed trajectory (its embedding cleared on its shard, on a worker), a new row and a bad one
        other = c.execute("SELECT geom::text FROM trips WHERE id = 5").fetchone()[0]  # (Citus: no subquery here)
        c.execute("UPDATE trips SET geom = %s::geometry WHERE id = 3", [other])
        assert c.execute("SELECT e IS NULL, e_model IS NULL FROM trips WHERE id = 3").fetchone() == (True, True)
        assert c.execute("SELECT e IS NOT NULL FROM trips WHERE id = 4").fetchone() == (True,)
        c.execute("INSERT INTO trips (id, geom) VALUES (1000, ST_SetSRID(ST_MakeLine(ST_MakePointM(116.3, 39.9, 1e9),"
                  " ST_MakePointM(116.31, 39.91, 1e9 + 60)), 4326))")
        c.execute("INSERT INTO trips (id, geom) VALUES (1001, ST_SetSRID(ST_MakeLine(ST_MakePointM(116.3, 95, 1e9),"
                  " ST_MakePointM(116.4, 95, 1e9 + 60)), 4326))")
        c.execute("CALL pgtraj.process_queue('fresh')")
        job = c.execute("SELECT kind, status, total, done, failed FROM pgtraj.job_status ORDER BY id DESC LIMIT 1"
                        ).fetchone()
        assert job == ("refresh", "succeeded", 3, 3, 1)
        assert c.execute("SELECT bool_and(e <-> pgtraj.embed(geom, 'm') < 1e-4) FROM trips WHERE id IN (3, 1000)"
                         ).fetchone() == (True,)
        assert c.execute("SELECT key, sqlstate FROM pgtraj.embedding_errors WHERE key = '1001'").fetchall() == \
            [("1001", "22023")]
        status = c.execute("SELECT pending, failed, last_run_status FROM pgtraj.embedding_status WHERE name = 'fresh'"
                           ).fetchone()
        assert status == (None, 1, "succeeded")  # nothing is queued there: its stale rows wait instead
        c.execute("SELECT pgtraj.drop_embedding_target('fresh')")
        c.execute("UPDATE trips SET geom = %s::geometry WHERE id = 4", [other])
        assert c.execute("SELECT e IS NOT NULL FROM trips WHERE id = 4").fetchone() == (True,)  # trigger gone
        c.execute("DELETE FROM trips WHERE id IN (1000, 1001)")
        c.execute("DELETE FROM pgtraj.embedding_errors")


@needs_citus
def test_training_reads_a_distributed_table_like_a_local_one(citus):
    """`pgtraj train` streams its source through a cursor on the coordinator: a distributed table gives the
    same cleaned, split trajectories as a local copy of it."""
    from pgtraj.app.training import read_source
    from pgtraj.learn.train import TrainConfig

    coordinator, _ = citus
    with psycopg.connect(coordinator.url(), autocommit=True) as c:
        c.execute("CREATE TABLE trips_local AS SELECT id, geom FROM trips")
        n = c.execute("SELECT count(*) FROM trips").fetchone()[0]
        try:
            dist, dist_desc = read_source(c, "trips", TrainConfig(), log=lambda m: None)
            local, _ = read_source(c, "trips_local", TrainConfig(), log=lambda m: None)
        finally:
            c.execute("DROP TABLE trips_local")
    assert dist_desc["rows"] == n >= 12
    for split in ("train", "val", "test"):
        assert [(t.id, t.t.tolist(), t.lon.tolist()) for t in dist.splits[split]] == \
               [(t.id, t.t.tolist(), t.lon.tolist()) for t in local.splits[split]]
    assert sum(len(v) for v in dist.splits.values()) > 0


@needs_citus
def test_sql_training_on_the_coordinator_reads_a_distributed_table(citus):
    """CALL pgtraj.train on a Citus coordinator reads a distributed table through its distributed queries,
    registers the model in the reference tables, and every worker serves it in a pushed-down query."""
    from .test_sql_training import TINY, make_table

    coordinator, _ = citus
    with psycopg.connect(coordinator.url(), autocommit=True) as c:
        make_table(c, "train_trips", n=30)  # filled locally (Citus takes no subquery in VALUES), then spread
        c.execute("SELECT create_distributed_table('train_trips', 'id', shard_count => 4)")
        c.execute("CALL pgtraj.train('citus-sql', 'train_trips', 'next_cell', %s::jsonb)", [json.dumps(TINY)])
        status, outcome = c.execute("SELECT status, outcome FROM pgtraj.training_status"
                                    " WHERE model_name = 'citus-sql'").fetchone()
        assert status == "succeeded" and outcome.startswith("registered v1"), outcome
        served = c.execute("SELECT count(DISTINCT t.id) FROM train_trips t, pgtraj.predict_next(t.geom, 'citus-sql',"
                           " k => 1) p").fetchone()[0]
        assert served == 30
    assert on_each_worker(coordinator, "SELECT count(*) FROM pgtraj.model_registry WHERE name = 'citus-sql'") \
        == [[(1,)]] * 2
