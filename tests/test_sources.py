"""Any trajectory table: a point table of real seabird tracks (../shared/data/seabirds) loaded as the file has
it, trained on from the CLI and from SQL with no split, no geometry and no cleaning settings; tables whose
time, position or id cannot be used are refused by column before anything is read in bulk."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import psycopg
import pytest

from pgtraj.app.training import describe_source
from pgtraj.core.errors import SourceError
from pgtraj.core.tokenizer import choose_resolution
from pgtraj.core.trajectory import Trajectory
from pgtraj.db.datasets import default_data_dir
from pgtraj.db.files import load_file

SEABIRDS = default_data_dir() / "seabirds" / "points.parquet"
needs_seabirds = pytest.mark.skipif(not SEABIRDS.exists(), reason=f"seabird tracks not found at {SEABIRDS}")
# the ten birds of one colony (Fernando de Noronha, Brazil): 103,836 fixes
COLONY = "SELECT * FROM birds WHERE colony = 'BRA_FDN_MEI'"
TINY = {"preset": "tiny", "steps": 4, "batch_size": 8, "max_len": 32, "warmup": 1, "eval_every": 2,
        "eval_batches": 1, "min_trajectories": 2, "init_from": None, "tokenizer": {"min_count": 1}}


def cli(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "PGTRAJ_DSN"}
    return subprocess.run([sys.executable, "-m", "pgtraj", *args], capture_output=True, text=True, env=env)


@pytest.fixture
def birds(db):
    with psycopg.connect(db) as conn:
        r = load_file(conn, SEABIRDS, "birds", progress=False, log=lambda m: None)
    assert r.rows == 925_148 and r.columns["ts"] == "bigint" and r.columns["geom"] == "geometry(Point, 4326)"
    return db


@needs_seabirds
def test_a_point_table_of_seabirds_trains_from_the_cli_without_reshaping(birds, tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = cli("train", "birds", "--dsn", birds, "--table", COLONY, "--id-column", "bird_id", "--config", str(config),
              "--objective", "next_cell", "--out", str(tmp_path / "run"), "--deploy")
    assert out.returncode == 0, out.stderr
    assert "reading query (points: id bird_id, time ts, traj geom; 103,836 rows)" in out.stderr
    assert "cleaning: speed limit" in out.stderr and "(auto: 3 x" in out.stderr
    assert (tmp_path / "run" / "tokenizer.json").exists()
    with psycopg.connect(birds) as conn:
        tok, data = conn.execute("SELECT m.tokenizer, m.metrics -> 'data' FROM pgtraj.deployments d"
                                 " JOIN pgtraj.model_registry m ON m.id = d.model_id WHERE d.name = 'birds'").fetchone()
        fixes = conn.execute("SELECT bird_id, ts, lat, lon FROM birds WHERE colony = 'BRA_FDN_MEI'"
                             " ORDER BY bird_id, ts").fetchall()
        # the same fixes, read here without the database's help: the resolution chosen from them is the run's
        ids = np.array([f[0] for f in fixes])
        tracks = [Trajectory(b, np.array([f[1] for f, i in zip(fixes, ids) if i == b], float),
                             np.array([f[2] for f, i in zip(fixes, ids) if i == b]),
                             np.array([f[3] for f, i in zip(fixes, ids) if i == b])) for b in np.unique(ids)]
        assert tok["config"]["resolution"] == choose_resolution(tracks)[0] and tok["config"]["timezone"] == "auto"
        assert data["shape"] == "points" and data["rows"] == 103_836 and data["split"]["by"] == "time"
        assert data["split"]["entities"] == 10 and all(data["split"][s]["pieces"] >= 10 for s in ("train", "val", "test"))
        assert data["cleaning"]["discarded_share"] < 0.01
        # served at once on the point table's own rows: a bird's last hour as a point array
        rows = conn.execute(
            "SELECT count(*), max(p.probability) FROM (SELECT array_agg(geom ORDER BY ts) g, array_agg(to_timestamp(ts)"
            " ORDER BY ts) t FROM birds WHERE bird_id = %s AND ts > (SELECT max(ts) - 3600 FROM birds WHERE"
            " bird_id = %s)) x, pgtraj.predict_next(pgtraj.line(x.g, x.t), 'birds') p",
            [str(ids[0])] * 2).fetchone()
        assert rows[0] == 5 and 0 < rows[1] <= 1


@needs_seabirds
def test_a_point_table_trains_in_sql_held_out_by_entity_and_classifies_species(birds):
    with psycopg.connect(birds, autocommit=True) as conn:
        said = []
        conn.add_notice_handler(lambda d: said.append(d.message_primary))
        conn.execute("CALL pgtraj.train('species', %s, 'classify', %s::jsonb, 'always')",
                     [COLONY, json.dumps({**TINY, "id_column": "bird_id", "label_column": "species",
                                          "split_by": "entity"})])
        data = conn.execute("SELECT metrics -> 'data' FROM pgtraj.training_runs ORDER BY id DESC LIMIT 1").fetchone()[0]
        held = data["split"]["val_entities"] + data["split"]["test_entities"]
        assert data["split"]["by"] == "entity" and len(data["split"]["val_entities"]) >= 1 and len(held) >= 3
        assert any("split by entity" in m for m in said), said
        classes = set(conn.execute("SELECT config -> 'classes' FROM pgtraj.model_registry WHERE name = 'species'"
                                   ).fetchone()[0])
        assert classes == {"SSUL", "SDAC"}  # both SDAC birds are among the trained ones (the split is a stable hash)
        label = conn.execute(
            "SELECT c.label FROM (SELECT pgtraj.line(array_agg(geom ORDER BY ts), array_agg(to_timestamp(ts)"
            " ORDER BY ts)) g FROM birds WHERE bird_id = %s) x, pgtraj.classify(x.g, 'species') c LIMIT 1",
            [held[0]]).fetchone()[0]
        assert label in classes


@needs_seabirds
def test_cleaning_that_would_discard_most_fixes_stops_the_run(birds, tmp_path):
    """Birds fly at 10-20 m/s: the walking profile takes 15% of these birds' fixes (every one in flight) for
    GPS errors; above the run's max_discard (5% here) the run stops before training and says what to do, and
    --allow-discard overrides it."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**TINY, "cleaning": {"max_discard": 0.05}}))
    args = ["train", "walkers", "--dsn", birds, "--table", COLONY, "--id-column", "bird_id", "--config", str(config),
            "--out", str(tmp_path / "run"), "--profile", "walk"]
    out = cli(*args)
    assert out.returncode == 1 and "error: cleaning discarded 15." in out.stderr and "more than max_discard 5%" in out.stderr
    assert "hint: choose the data's profile" in out.stderr
    with psycopg.connect(birds) as conn:
        assert conn.execute("SELECT status, error LIKE 'cleaning discarded%%' FROM pgtraj.training_runs").fetchall() \
            == [("failed", True)]
        assert conn.execute("SELECT count(*) FROM pgtraj.model_registry").fetchone() == (0,)
    assert cli(*args, "--allow-discard").returncode == 0


POINT_TABLES = """
CREATE TABLE fixes (vessel uuid, ts timestamptz, lat float8, lon float8, note text);
INSERT INTO fixes SELECT v, '2024-06-01 00:00Z'::timestamptz + i * interval '30 s', 51.9 + i * 1e-3, 4.1 + v2 * 0.1, 'x'
  FROM (VALUES ('6f1c9a52-0000-4000-8000-000000000001'::uuid, 1), ('6f1c9a52-0000-4000-8000-000000000002', 2)) AS v(v, v2),
       generate_series(0, 59) i;
CREATE TABLE no_time (vessel int, geom geometry(Point, 4326));
INSERT INTO no_time VALUES (1, 'SRID=4326;POINT(4 52)');
CREATE TABLE text_time (vessel int, ts text, geom geometry(Point, 4326));
INSERT INTO text_time VALUES (1, '2024-06-01 10:00', 'SRID=4326;POINT(4 52)');
CREATE TABLE two_geoms (id int PRIMARY KEY, a geometry(LineStringM, 4326), b geometry(LineStringM, 4326));
"""


@pytest.fixture
def tables(db):
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(POINT_TABLES)
        yield conn


def test_a_point_table_of_uuid_ids_with_lat_lon_columns_is_described(tables):
    d = describe_source(tables, "fixes", {"id_column": "vessel"})
    assert d["shape"] == "points" and d["columns"] == {"lat_column": "lat", "lon_column": "lon", "time_column": "ts",
                                                        "id_column": "vessel"}
    # a query is described the same way, its tables named as the caller names them
    q = describe_source(tables, "SELECT vessel AS who, ts, lat, lon FROM fixes", {"id_column": "who"})
    assert q["shape"] == "points" and q["columns"]["id_column"] == "who" and q["rows"] == 120
    tables.execute("SET search_path = pg_catalog")  # what pgtraj writes is qualified: it runs in any search_path
    rows = tables.execute(d["query"]).fetchall()
    assert [r[1] for r in rows] == ["6f1c9a52-0000-4000-8000-000000000001", "6f1c9a52-0000-4000-8000-000000000002"]
    assert all(r[2] is not None and r[3] is None for r in rows)  # one LINESTRING M per vessel, no reason


@pytest.mark.parametrize("source, options, sqlstate, message, hint", [
    ("no_time", {"id_column": "vessel"}, "42703", "no_time has one row per fix but no time column", "time_column"),
    ("text_time", {"id_column": "vessel", "time_column": "ts"}, "42804", "text_time.ts (time_column) is text",
     "to_timestamp"),
    ("fixes", {}, "42703", "fixes has one row per fix: name the column that says whose fix it is",
     "candidates: vessel, ts, lat, lon, note"),
    ("fixes", {"id_column": "boat"}, "42703", "fixes has no column 'boat' (id_column)", "its columns: vessel"),
    ("two_geoms", {}, "42P09", "two_geoms has several trajectory columns (a, b)", "traj_column"),
    ("fixes", {"id_colum": "vessel"}, "22023", "unknown source options ['id_colum']", "id_column"),
])
def test_sources_that_cannot_be_read_are_refused_by_column(tables, source, options, sqlstate, message, hint):
    with pytest.raises(psycopg.Error) as err:
        tables.execute("SELECT pgtraj.describe_source(%s::regclass, %s::jsonb)", [source, json.dumps(options)])
    assert err.value.sqlstate == sqlstate and message in err.value.diag.message_primary
    assert hint in err.value.diag.message_hint
    with pytest.raises(SourceError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        describe_source(tables, source, options)


def test_null_ids_are_refused_before_reading(tables):
    tables.execute("INSERT INTO fixes VALUES (NULL, now(), 52, 4, 'lost'), (NULL, now(), 52, 4, 'lost')")
    with pytest.raises(psycopg.errors.NotNullViolation) as err:
        tables.execute("SELECT pgtraj.describe_source('fixes'::regclass, '{\"id_column\": \"vessel\"}')")
    assert "2 of the 122 rows of public.fixes have a NULL id (vessel)" in err.value.diag.message_primary
    assert "WHERE vessel IS NOT NULL" in err.value.diag.message_hint


def test_a_point_table_trains_and_splits_by_time(tables, tmp_path):
    """Fixes without a time are counted and skipped; the splits the run made are recorded with it."""
    tables.execute("INSERT INTO fixes VALUES ('6f1c9a52-0000-4000-8000-000000000001', NULL, 52, 4, 'no time')")
    tables.execute("CALL pgtraj.train('v', 'fixes', 'next_cell', %s::jsonb)",
                   [json.dumps({**TINY, "id_column": "vessel", "cleaning": {"min_duration_s": 0}})])
    data = tables.execute("SELECT metrics -> 'data' FROM pgtraj.training_runs").fetchone()[0]
    assert data["incomplete_fixes"] == 1 and data["split"]["by"] == "time"
    assert {s: data["split"][s]["fixes"] for s in ("train", "val", "test")} == {"train": 84, "val": 12, "test": 24}


GPX = """<?xml version="1.0" encoding="UTF-8"?>
<gpx version="1.1" creator="a watch" xmlns="http://www.topografix.com/GPX/1/1">
 <trk><name>morning run</name><trkseg>
{points}
 </trkseg></trk>
</gpx>"""


def test_gpx_and_csv_files_load_as_point_tables(db, tmp_path):
    """`pgtraj load file`: a GPX track (times with and without fractions of a second, elevation) and a CSV
    with day-first times become point tables that describe_source reads without further options."""
    pts = "\n".join(f'  <trkpt lat="{52.0 + i * 1e-4:.6f}" lon="4.3"><ele>{i}.5</ele>'
                    f'<time>2024-03-31T00:5{i // 60}:{i % 60:02d}{".250" if i % 2 else ""}Z</time></trkpt>'
                    for i in range(120))
    (tmp_path / "run.gpx").write_text(GPX.format(points=pts))
    out = cli("load", "file", "--dsn", db, "--path", str(tmp_path / "run.gpx"), "--table", "sport.runs")
    assert out.returncode == 0 and "loaded 120 rows into sport.runs" in out.stderr, out.stderr
    (tmp_path / "fleet.csv").write_text("truck,when,latitude,longitude\n" + "".join(
        f"T{k},{1 + i // 60:02d}/06/2024 10:{i % 60:02d}:00,{51.9 + i * 1e-3},{4.1 + k}\n"
        for k in (1, 2) for i in range(60)))
    out = cli("load", "file", "--dsn", db, "--path", str(tmp_path / "fleet.csv"), "--table", "fleet",
              "--time-column", "when", "--time-format", "%d/%m/%Y %H:%M:%S", "--id-column", "truck",
              "--trips", "fleet_trips")
    assert out.returncode == 0 and "pgtraj.make_trips: 2 trips of 2 points trajectories" in out.stderr, out.stderr
    with psycopg.connect(db) as conn:
        first, last, ele = conn.execute("SELECT min(ts), max(ts), max(ele) FROM sport.runs").fetchone()
        assert (first.isoformat(), last.isoformat(), ele) == ("2024-03-31T00:50:00+00:00",
                                                               "2024-03-31T00:51:59+00:00", 119.5)
        d = describe_source(conn, "sport.runs", {"id_column": "track"})
        assert d["shape"] == "points" and d["columns"]["time_column"] == "ts" and d["rows"] == 120
        d = describe_source(conn, "fleet", {"id_column": "truck"})
        assert d["columns"] == {"id_column": "truck", "time_column": "when", "traj_column": "geom"}
        assert conn.execute("SELECT min(\"when\")::text FROM fleet").fetchone()[0] == "2024-06-01 10:00:00+00"
        assert conn.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'fleet'").fetchone()[0] == 1
        assert conn.execute("SELECT array_agg(truck ORDER BY truck), sum(fixes) FROM fleet_trips").fetchone() \
            == (["T1", "T2"], 120)


@needs_seabirds
def test_fixes_become_a_table_of_trips_that_every_function_takes(birds, login_role):
    """CALL pgtraj.make_trips: the seabirds' fixes become one LINESTRING M per trip (cut at pauses, cleaned as
    training cleans, keyed by a bigint and the bird's own id); embed_table, similar and predict_next take it
    as it is. A pgtraj_user may build it from a table it can read."""
    with psycopg.connect(birds, autocommit=True) as conn:
        conn.execute("CREATE TABLE fdn AS " + COLONY)
        conn.execute("GRANT SELECT ON fdn TO pgtraj_user")
        conn.execute("CREATE SCHEMA out; GRANT USAGE, CREATE ON SCHEMA out TO pgtraj_user")
        conn.execute("CALL pgtraj.train('birds', 'fdn', 'next_cell', %s::jsonb, 'always')",
                     [json.dumps({**TINY, "id_column": "bird_id"})])
    with psycopg.connect(login_role("pgtraj_user")(birds), autocommit=True) as conn:
        said = []
        conn.add_notice_handler(lambda d: said.append(d.message_primary))
        conn.execute("CALL pgtraj.make_trips('fdn', 'out.trips', '{\"id_column\": \"bird_id\", \"label_column\":"
                     " \"species\"}')")
        assert any(m.startswith("pgtraj.make_trips: ") and "trips of 10 points trajectories into \"out\".trips" in m
                   for m in said), said
        n, fixes, birds_, labels, ok = conn.execute(
            "SELECT count(*), sum(fixes), count(DISTINCT bird_id), array_agg(DISTINCT label ORDER BY label),"
            " bool_and(ST_IsValidTrajectory(geom) AND ST_NPoints(geom) = fixes AND start_at < end_at) FROM out.trips"
        ).fetchone()
        assert n >= 10 and birds_ == 10 and labels == ["SDAC", "SSUL"] and ok and 0.99 * 103_836 < fixes <= 103_836
        with pytest.raises(psycopg.errors.DuplicateTable):
            conn.execute("CALL pgtraj.make_trips('fdn', 'out.trips', '{\"id_column\": \"bird_id\"}')")
        conn.execute("ALTER TABLE out.trips ADD COLUMN embedding vector(32)")
        conn.execute("CALL pgtraj.embed_table('out.trips', 'geom', 'embedding', 'birds')")
        assert conn.execute("SELECT count(*) FROM out.trips WHERE embedding IS NULL").fetchone() == (0,)
        first = conn.execute("SELECT s.id FROM out.trips t, pgtraj.similar('out.trips', 'embedding', t.embedding, 1) s"
                             " WHERE t.trip_id = 1").fetchone()[0]
        assert first == "1"  # a trip is its own nearest neighbour
        assert conn.execute("SELECT count(*) FROM out.trips t, pgtraj.predict_next(t.geom, 'birds') p"
                            " WHERE t.trip_id = 2").fetchone()[0] >= 1
        conn.execute("DROP TABLE out.trips")  # the login role is dropped after the test


def test_altitude_is_a_feature_where_the_fixes_have_one(tables):
    """POINT Z fixes (aircraft climbing): the run reads the Z, the model takes altitude as a feature, and in
    SQL the same track at another altitude embeds differently; a model of flat fixes reads eight columns."""
    tables.execute("""
        CREATE TABLE flights (flight text, ts timestamptz, geom geometry(PointZ, 4326));
        INSERT INTO flights SELECT 'F' || f, '2024-06-01 08:00Z'::timestamptz + i * interval '20 s',
               ST_SetSRID(ST_MakePoint(4.0 + i * 0.03, 52.0 + f * 0.2, 300.0 + i * 120.0), 4326)
          FROM generate_series(1, 6) f, generate_series(0, 89) i""")
    d = describe_source(tables, "flights", {"id_column": "flight"})
    assert "ST_MakePoint(" in d["query"] and "ST_Z(" in d["query"]
    tables.execute("CALL pgtraj.train('planes', 'flights', 'next_cell', %s::jsonb, 'always')",
                   [json.dumps({**TINY, "id_column": "flight", "cleaning": {"profile": "aircraft"}})])
    assert tables.execute("SELECT config -> 'model' ->> 'n_continuous' FROM pgtraj.model_registry"
                          " WHERE name = 'planes'").fetchone() == ("9",)
    line = ("SELECT ST_MakeLine(ST_MakePoint(4.0 + i * 0.03, 52.1, {z}, 1717228800 + i * 20) ORDER BY i)"
            " FROM generate_series(0, 89) i")
    low, high, same = tables.execute(
        f"SELECT pgtraj.embed(({line.format(z='300.0 + i * 120.0')}), 'planes')::text,"
        f" pgtraj.embed(({line.format(z='9000.0')}), 'planes')::text,"
        f" pgtraj.embed(({line.format(z='300.0 + i * 120.0')}), 'planes')::text").fetchone()
    assert low == same and low != high
    tables.execute("CALL pgtraj.train('boats', 'fixes', 'next_cell', %s::jsonb, 'always')",
                   [json.dumps({**TINY, "id_column": "vessel", "cleaning": {"min_duration_s": 0}})])
    assert tables.execute("SELECT config -> 'model' ->> 'n_continuous' FROM pgtraj.model_registry"
                          " WHERE name = 'boats'").fetchone() == ("8",)
