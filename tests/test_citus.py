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
