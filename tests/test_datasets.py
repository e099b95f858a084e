"""Loading real GeoLife data (a few small users, from ../shared/data) and the shared split definition."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import psycopg
import pytest

from pgtraj.core.clean import CleaningReport, clean
from pgtraj.core.errors import SourceError
from pgtraj.core.splits import FRACTIONS, chronological_split, entity_split, timeline_split
from pgtraj.core.trajectory import Trajectory
from pgtraj.db.datasets import default_data_dir, load_geolife, parse_ids
from pgtraj.db.readers import (
    LineStringSource,
    PointSource,
    TemporalSource,
    TrajectoryReader,
)

GEOLIFE = default_data_dir() / "geolife"
SMALL_USERS = [53, 60, 90, 107, 117]  # the five smallest users: ~1,200 fixes, two of them with mode labels
needs_data = pytest.mark.skipif(not (GEOLIFE / "points.parquet").exists(), reason=f"GeoLife not found at {GEOLIFE}")


def test_chronological_split_is_per_entity_and_in_time_order():
    rng = np.random.default_rng(0)
    entity = rng.integers(0, 20, 2000)
    start = rng.uniform(0, 1e6, 2000)
    split = chronological_split(entity, start)
    for e in range(20):
        m = entity == e
        by_split = {s: start[m & (split == s)] for s in FRACTIONS}
        if all(len(v) for v in by_split.values()):
            assert by_split["train"].max() < by_split["val"].min() <= by_split["val"].max() < by_split["test"].min()
    shares = {s: np.mean(split == s) for s in FRACTIONS}
    assert all(abs(shares[s] - f) < 0.05 for s, f in FRACTIONS.items())


def test_entity_split_holds_out_whole_entities_stably():
    entity = np.repeat(np.arange(300), 3)
    a, b = entity_split(entity), entity_split(entity)
    assert (a == b).all()
    for e in range(300):
        assert len(set(a[entity == e])) == 1
    assert 0.6 < np.mean(a == "train") < 0.8


def test_entity_split_holds_out_at_least_one_entity_each_when_it_can():
    for n in (3, 4, 7, 26):
        names = entity_split(np.arange(n))
        assert (names == "val").sum() >= 1 and (names == "test").sum() >= 1 and (names == "train").sum() >= n // 2
    assert set(entity_split(np.array(["a", "b"]))) == {"train"}


def test_timeline_split_cuts_each_entitys_long_tracks_in_time():
    """Two tagged animals, each one long track: each is cut where 70% and 80% of its fixes lie behind, so
    val and test are every entity's latest fixes, and no fix is lost or shared."""
    tracks = [Trajectory(e, 1e9 + np.arange(n) * 10.0, np.zeros(n), np.zeros(n)) for e, n in (("a", 100), ("b", 50))]
    out = timeline_split(tracks, ["a", "b"])
    assert {k: sorted(len(p) for p in v) for k, v in out.items()} == {"train": [35, 70], "val": [5, 10],
                                                                      "test": [10, 20]}
    for e in ("a", "b"):
        t = {k: np.concatenate([p.t for p in v if p.id == e]) for k, v in out.items()}
        assert t["train"].max() < t["val"].min() <= t["val"].max() < t["test"].min()


def test_parse_ids():
    assert parse_ids("0-3,7") == [0, 1, 2, 3, 7] and parse_ids(None) is None and parse_ids("all") is None
    with pytest.raises(SourceError, match="bad id list"):
        parse_ids("a-b")


def geolife_zip(path, files: dict, labels: dict) -> None:
    """A zip in the GeoLife 1.3 distribution's layout: {(user, name): [(ts, lat, lon, alt), ...]} and
    {user: [(start, end, mode), ...]} (epoch seconds)."""
    import zipfile
    from datetime import datetime, timezone

    def stamp(ts, fmt):
        return datetime.fromtimestamp(ts, timezone.utc).strftime(fmt)

    with zipfile.ZipFile(path, "w") as z:
        for (user, name), fixes in files.items():
            head = "Geolife trajectory\nWGS 84\nAltitude is in Feet\nReserved 3\n0,2,255,My Track,0,0,2,8421376\n0\n"
            z.writestr(f"Geolife Trajectories 1.3/Data/{user:03d}/Trajectory/{name}.plt", head + "".join(
                f"{lat},{lon},0,{alt},{ts / 86400 + 25569},{stamp(ts, '%Y-%m-%d,%H:%M:%S')}\n" for ts, lat, lon, alt in fixes))
        for user, rows in labels.items():
            z.writestr(f"Geolife Trajectories 1.3/Data/{user:03d}/labels.txt", "Start Time\tEnd Time\tTransportation Mode\n"
                       + "".join(f"{stamp(a, '%Y/%m/%d %H:%M:%S')}\t{stamp(b, '%Y/%m/%d %H:%M:%S')}\t{m}\n" for a, b, m in rows))


@needs_data
def test_load_geolife_from_the_official_zip_layout(db, tmp_path):
    """The distribution's own files (.plt in GMT, labels.txt) load into the same tables as the parquet copy:
    the same fixes, trajectory ids and labels."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(GEOLIFE / "points.parquet").filter(pc.is_in(pc.field("traj_id"), pa.array([0, 1], pa.int32())))
    rows = t.to_pylist()
    files = {(0, name): [(r["ts"], r["lat"], r["lon"], r["alt_ft"]) for r in rows if r["traj_id"] == k]
             for k, name in enumerate(("20081023025304", "20081024020959"))}
    geolife_zip(tmp_path / "Geolife Trajectories 1.3.zip", files, {0: [(1224730384, 1224730999, "walk")]})
    with psycopg.connect(db) as conn:
        report = load_geolife(conn, tmp_path / "Geolife Trajectories 1.3.zip", progress=False, log=lambda m: None)
        assert (report.points, report.trajectories, report.labels) == (len(rows), 2, 1)
        got = conn.execute("SELECT traj_id, ts_epoch, lat, lon FROM geolife.points ORDER BY traj_id, ts_epoch, lat"
                           ).fetchall()
        want = sorted((r["traj_id"], r["ts"], r["lat"], r["lon"]) for r in rows)
        assert got == want
        assert conn.execute("SELECT user_id, extract(epoch FROM start_ts)::int, mode FROM geolife.labels"
                            ).fetchall() == [(0, 1224730384, "walk")]


@needs_data
def test_load_geolife_subset_into_all_three_shapes(db):
    with psycopg.connect(db) as conn:
        report = load_geolife(conn, GEOLIFE, users=SMALL_USERS, progress=False, log=lambda m: None)
        assert report.users == len(SMALL_USERS) and report.points > 1000
        n_points = conn.execute("SELECT count(*) FROM geolife.points").fetchone()[0]
        assert n_points == report.points  # everything as recorded, duplicates included
        assert conn.execute("SELECT sum(n_points) FROM geolife.trajectories").fetchone()[0] == n_points
        assert conn.execute("SELECT count(*) FROM geolife.trajectories WHERE split IS NULL").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM geolife.labels").fetchone()[0] == report.labels > 0
        # the three shapes read back to the same fixes (tgeompoint without duplicate timestamps)
        lines = {t.id: t for t in TrajectoryReader(conn, LineStringSource("geolife.trajectories", id="traj_id"))}
        points = {t.id: t for t in TrajectoryReader(conn, PointSource("geolife.points", id="traj_id", time="ts",
                                                                        geom="geom"))}
        trips = {t.id: t for t in TrajectoryReader(conn, TemporalSource("geolife.trips", id="traj_id"))}
        assert lines.keys() == points.keys() == trips.keys()
        # loaded as recorded: a line is a valid PostGIS trajectory exactly when its times strictly increase
        invalid = {k for (k,) in conn.execute("SELECT traj_id FROM geolife.trajectories"
                                               " WHERE n_points > 1 AND NOT ST_IsValidTrajectory(geom)")}
        assert invalid == {k for k, t in lines.items() if (np.diff(t.t) <= 0).any()}
        for k, line in lines.items():
            assert np.array_equal(line.t, points[k].t)
            # MobilityDB normalises linear sequences: it keeps a subset of the (deduplicated) fixes, and the
            # ones it drops lie exactly on the path it interpolates, so the movement is the same function of time
            dedup = line.take(np.concatenate([[True], np.diff(line.t) > 0]))
            trip = trips[k]
            assert np.isin(trip.t, dedup.t).all() and trip.t[[0, -1]].tolist() == dedup.t[[0, -1]].tolist()
            assert np.allclose(np.interp(dedup.t, trip.t, trip.lat), dedup.lat, atol=1e-9)
            assert np.allclose(np.interp(dedup.t, trip.t, trip.lon), dedup.lon, atol=1e-9)
        report_clean = CleaningReport()
        kept = [p for tr in lines.values() for p in clean(tr, report=report_clean)]
        c = report_clean.counts
        assert c["points_in"] == n_points == c["points_out"] + c["duplicate_timestamps"] + c["out_of_order"] \
            + c["speed_outliers"] + c["short_piece_points"]
        assert kept


@needs_data
def test_loading_twice_needs_replace_and_keeps_data(db):
    with psycopg.connect(db) as conn:
        load_geolife(conn, GEOLIFE, users=SMALL_USERS[:2], progress=False, log=lambda m: None)
        before = conn.execute("SELECT count(*) FROM geolife.points").fetchone()[0]
        with pytest.raises(SourceError, match="already exists"):
            load_geolife(conn, GEOLIFE, users=SMALL_USERS, progress=False, log=lambda m: None)
        assert conn.execute("SELECT count(*) FROM geolife.points").fetchone()[0] == before
        with pytest.raises(SourceError, match="no GeoLife points"):
            load_geolife(conn, GEOLIFE, users=[9999], replace=True, progress=False, log=lambda m: None)
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM geolife.points").fetchone()[0] == before  # failed reload: intact


def test_missing_files_are_named(db, tmp_path):
    with psycopg.connect(db) as conn, pytest.raises(SourceError, match="points.parquet not found"):
        load_geolife(conn, tmp_path, log=lambda m: None)


@needs_data
def test_cli_load(db):
    env = {k: v for k, v in os.environ.items() if k != "PGTRAJ_DSN"}
    out = subprocess.run([sys.executable, "-m", "pgtraj", "load", "geolife", "--dsn", db, "--users", "53,60",
                          "--schema", "gl"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "loaded" in out.stderr and "gl.trajectories" in out.stderr
    out = subprocess.run([sys.executable, "-m", "pgtraj", "load", "geolife", "--dsn", db, "--users", "53",
                          "--schema", "gl"], capture_output=True, text=True, env=env)
    assert out.returncode == 1 and "--replace" in out.stderr


@needs_data
def test_quickstart_end_to_end(tmp_path):
    from .conftest import CACHE, new_home

    home = new_home()
    (home / "runtime-venv").symlink_to(CACHE / "runtime-venv")  # reuse the suite's built environment
    env = {**{k: v for k, v in os.environ.items() if k != "PGTRAJ_DSN"}, "PGTRAJ_HOME": str(home)}
    try:
        out = subprocess.run([sys.executable, "-m", "pgtraj", "quickstart", "--users", ",".join(map(str, SMALL_USERS)),
                              "--out", str(tmp_path), "--steps", "4"],
                             capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        assert "loaded GeoLife" in out.stderr and "in SQL: pgtraj.tokenize" in out.stderr
        assert "registered pgtraj-base v1" in out.stderr and "initialised from pgtraj-base v1" in out.stderr
        assert "registered geolife-next v1" in out.stderr and "5 trips most similar" in out.stderr
        assert (tmp_path / "prediction.png").stat().st_size > 1000
        import json

        summary = json.loads((tmp_path / "quickstart.json").read_text())
        assert summary["vocab_size"] > 5 and 0.0 <= summary["test_token_resolution_shares"]["unk"] <= 1.0
        assert (tmp_path / "tokenizer.json").exists()
        assert summary["embedded"] > 0 and [r[0] for r in summary["prediction"]] == [1, 2, 3, 4, 5]
    finally:
        subprocess.run([sys.executable, "-m", "pgtraj", "db", "stop"], env=env, capture_output=True)
        subprocess.run(["rm", "-rf", str(home)])
