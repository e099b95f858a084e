"""A hot standby of the local cluster (LocalCluster.start_replica: pg_basebackup -R, streaming): every read-only
pgtraj function works there, a redeploy on the primary is seen once replayed, and what writes is refused with a
clear error, never a crash."""

from __future__ import annotations

import shutil
import time

import psycopg
import pytest

from .conftest import new_home
from .test_embed_table import fill
from .test_inference import models, register  # noqa: F401  (models: the module's fixture)


def replayed(primary: psycopg.Connection, replica_url: str, timeout: float = 120.0) -> None:
    """Wait until the standby has replayed everything the primary has written so far."""
    lsn = primary.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(replica_url, autocommit=True) as r:
                if r.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [lsn]).fetchone()[0]:
                    return
        except psycopg.OperationalError:  # still starting up
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the standby did not replay {lsn} in {timeout} s")
        time.sleep(0.2)


@pytest.fixture
def standby(cluster, db, models):  # noqa: F811
    with psycopg.connect(db, autocommit=True) as c:
        register(c, models[0])
        c.execute("CREATE TABLE trips (id int PRIMARY KEY, geom geometry(LineStringM, 4326), embedding vector(32))")
        fill(c)
        c.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm')")
        c.execute("SELECT pgtraj.create_hnsw_index('trips', 'embedding')")
    replica = cluster.start_replica(new_home(), log=lambda m: None)
    url = replica.url(db.rsplit("/", 1)[1])
    with psycopg.connect(db, autocommit=True) as c:
        replayed(c, url)
    yield url
    replica.stop()
    shutil.rmtree(replica.home, ignore_errors=True)


READS = [
    "SELECT pgtraj.embed(geom, 'm') IS NOT NULL FROM trips WHERE id = 3",
    "SELECT pgtraj.similarity(a.geom, b.geom, 'm') BETWEEN -1 AND 1 FROM trips a, trips b WHERE a.id = 3 AND b.id = 4",
    "SELECT count(*) = 5 FROM pgtraj.predict_next((SELECT geom FROM trips WHERE id = 3), 'm')",
    "SELECT ST_NPoints(pgtraj.predict_path(geom, 'm', steps => 3)) = 4 FROM trips WHERE id = 3",
    "SELECT pgtraj.score(geom, 'm') > 0 FROM trips WHERE id = 3",
    "SELECT count(*) = 5 FROM pgtraj.similar('trips', 'embedding', row_id => 3, k => 5)",
    "SELECT count(*) = 5 FROM pgtraj.similar_rows(NULL::trips, 'embedding', (SELECT geom FROM trips WHERE id = 3), 'm', 5)",
    "SELECT count(*) > 0 FROM pgtraj.tokenize((SELECT geom FROM trips WHERE id = 3),"
    " (SELECT tokenizer FROM pgtraj.model_registry WHERE name = 'm' AND version = 1))",
    "SELECT (pgtraj.warmup('m') ->> 'graphs') IS NOT NULL",
    "SELECT count(*) = 1 FROM pgtraj.models WHERE name = 'm' AND deployed",
]


def test_a_standby_serves_every_read_only_function_and_sees_redeploys(standby, db, models):  # noqa: F811
    with psycopg.connect(standby, autocommit=True) as r:
        assert r.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        for query in READS:
            assert r.execute(query).fetchone() == (True,), query
        before = r.execute("SELECT pgtraj.embed(geom, 'm')::text FROM trips WHERE id = 3").fetchone()[0]
        for call in ("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm')",
                     "CALL pgtraj.train('x', 'trips', 'next_cell')"):
            with pytest.raises(psycopg.Error) as err:
                r.execute(call)
            assert err.value.sqlstate == "25006" and "hot standby" in err.value.diag.message_primary, call
            assert "primary" in err.value.diag.message_hint
        for call in ("SELECT pgtraj.deploy('m', '1')",
                     "CALL pgtraj.make_trips('trips', 'trips2', '{\"id_column\": \"id\"}')"):
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                r.execute(call)
        assert r.execute("SELECT 1").fetchone() == (1,)  # the session survives every refusal
    with psycopg.connect(db, autocommit=True) as c:
        register(c, models[1])  # v2, deployed
        replayed(c, standby)
    with psycopg.connect(standby, autocommit=True) as r:
        after = r.execute("SELECT pgtraj.embed(geom, 'm')::text FROM trips WHERE id = 3").fetchone()[0]
        assert after != before  # the same backend-less call now resolves to v2
        assert r.execute("SELECT version FROM pgtraj.deployments WHERE name = 'm'").fetchone() == (2,)
