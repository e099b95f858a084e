"""Reading trajectories from PostGIS, point tables, MobilityDB and queries, and tokenizing them in the
database with the very same code as the client (byte-identical output)."""

from __future__ import annotations

import h3
import numpy as np
import psycopg
import pytest

from pgtraj.core.errors import SourceError, TrajectoryError
from pgtraj.core.synthetic import grid_trips
from pgtraj.core.tokenizer import Tokenizer, TokenizerConfig, Tokens
from pgtraj.core.trajectory import from_wkb
from pgtraj.db.readers import (
    LineStringSource,
    PointSource,
    QuerySource,
    TemporalSource,
    TrajectoryReader,
)

TRIPS = grid_trips(12, seed=5)


def linestring_m(tr) -> str:
    return "LINESTRING M (" + ", ".join(f"{lo!r} {la!r} {t!r}" for t, la, lo in zip(tr.t.tolist(), tr.lat.tolist(), tr.lon.tolist())) + ")"


@pytest.fixture
def conn(db):
    with psycopg.connect(db) as c:
        c.execute("SET TIME ZONE 'UTC'")
        yield c


def load_lines(conn, trips=TRIPS, srid=4326):
    conn.execute("CREATE TABLE trips (id int PRIMARY KEY, geom geometry)")
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO trips VALUES (%s, ST_Transform(ST_GeomFromText(%s, 4326), %s))",
                        [(tr.id, linestring_m(tr), srid) for tr in trips])
    conn.commit()  # tests roll back after expected errors; the data must stay


def assert_same(a, b, exact=True):
    assert a.id == b.id and len(a) == len(b)
    if exact:
        assert np.array_equal(a.t, b.t) and np.array_equal(a.lat, b.lat) and np.array_equal(a.lon, b.lon)
    else:  # through a projection and back
        assert np.array_equal(a.t, b.t) and np.allclose(a.lat, b.lat, atol=1e-9) and np.allclose(a.lon, b.lon, atol=1e-9)


def test_linestring_source_exact(conn):
    load_lines(conn)
    reader = TrajectoryReader(conn, LineStringSource("trips"))
    got = sorted(reader, key=lambda t: t.id)
    for a, b in zip(got, TRIPS):
        assert_same(a, b)
    assert reader.report.trajectories == len(TRIPS) and reader.report.points == sum(map(len, TRIPS))
    assert not reader.report.rejected


def test_any_srid_is_transformed_to_wgs84(conn):
    load_lines(conn, srid=32650)  # UTM 50N, where Beijing is
    for a, b in zip(sorted(TrajectoryReader(conn, LineStringSource("trips")), key=lambda t: t.id), TRIPS):
        assert_same(a, b, exact=False)


def test_point_table_with_lat_lon_and_with_geometry(conn):
    conn.execute("CREATE TABLE fixes (traj bigint, ts timestamptz, lat float8, lon float8, pos geometry(Point, 3857))")
    rows = [(tr.id, float(t), float(la), float(lo)) for tr in TRIPS for t, la, lo in zip(tr.t, tr.lat, tr.lon)]
    rows = rows[::-1]  # stored out of order: the reader orders by time
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO fixes VALUES (%s, to_timestamp(%s), %s, %s,"
                        " ST_Transform(ST_SetSRID(ST_MakePoint(%s, %s), 4326), 3857))",
                        [(i, t, la, lo, lo, la) for i, t, la, lo in rows])
    conn.execute("INSERT INTO fixes VALUES (0, NULL, 1, 1, NULL)")  # no time: counted, not silently lost
    for src, exact in ((PointSource("fixes", id="traj", time="ts", lat="lat", lon="lon"), True),
                       (PointSource("public.fixes", id="traj", time="ts", geom="pos"), False)):
        reader = TrajectoryReader(conn, src)
        got = sorted(reader, key=lambda t: t.id)
        assert len(got) == len(TRIPS) and reader.report.incomplete_fixes == 1
        for a, b in zip(got, TRIPS):
            assert a.id == b.id and np.allclose(a.t, b.t, atol=1e-6)  # timestamptz keeps microseconds
            assert np.allclose(a.lat, b.lat, atol=1e-9 if exact else 1e-7)


def test_point_table_with_epoch_seconds(conn):
    conn.execute("CREATE TABLE fixes (id int, t bigint, lat float8, lon float8)")
    conn.execute("INSERT INTO fixes VALUES (1, 1224730384, 39.9, 116.3), (1, 1224730390, 39.91, 116.31)")
    (tr,) = TrajectoryReader(conn, PointSource("fixes", time="t", lat="lat", lon="lon"))
    assert tr.t.tolist() == [1224730384.0, 1224730390.0]


def test_mobilitydb_tgeompoint_and_tgeogpoint(conn):
    conn.execute("CREATE TABLE moves (id int, trip tgeompoint, gtrip tgeogpoint)")
    with conn.cursor() as cur:
        for tr in TRIPS[:3]:
            cur.execute("""INSERT INTO moves
                SELECT %s, tgeompointSeq(array_agg(tgeompoint(ST_SetSRID(ST_MakePoint(lo, la), 4326), to_timestamp(t)) ORDER BY t)),
                           tgeogpointSeq(array_agg(tgeogpoint(ST_SetSRID(ST_MakePoint(lo, la), 4326)::geography, to_timestamp(t)) ORDER BY t))
                  FROM unnest(%s::float8[], %s::float8[], %s::float8[]) AS u(t, la, lo)""",
                        [tr.id, tr.t.tolist(), tr.lat.tolist(), tr.lon.tolist()])
    for column in ("trip", "gtrip"):
        got = sorted(TrajectoryReader(conn, TemporalSource("moves", temporal=column)), key=lambda t: t.id)
        assert [t.id for t in got] == [0, 1, 2]
        for a, b in zip(got, TRIPS[:3]):
            assert np.allclose(a.t, b.t, atol=1e-6) and np.allclose(a.lat, b.lat, atol=1e-9)


def test_tgeompoint_without_srid_needs_one(conn):
    conn.execute("CREATE TABLE moves (id int, trip tgeompoint)")
    conn.execute("INSERT INTO moves VALUES (1, '[Point(116.3 39.9)@2008-10-23 02:53:04+00, Point(116.31 39.91)@2008-10-23 02:53:10+00]')")
    reader = TrajectoryReader(conn, TemporalSource("moves"))
    assert list(reader) == [] and list(reader.report.rejected) == ["no SRID (read with srid=..., or ST_SetSRID in the table)"]
    (tr,) = TrajectoryReader(conn, TemporalSource("moves"), srid=4326)
    assert tr.t.tolist() == [1224730384.0, 1224730390.0]


def test_tgeompoint_values_pgtraj_cannot_use_are_refused_by_pgtraj(conn):
    """MobilityDB accepts a point off the globe in SRID 4326 (it checks times, not coordinates): pgtraj's
    reader sets the row aside by reason and id, and its SQL functions refuse it with 22023 naming the fix."""
    conn.execute("CREATE TABLE moves (id int, trip tgeompoint)")
    conn.execute("INSERT INTO moves VALUES (1, '[SRID=4326;Point(116.3 95)@2008-10-23 02:53:04+00,"
                 " SRID=4326;Point(116.31 95.01)@2008-10-23 02:53:10+00]'), (2, '[SRID=4326;Point(116.3 39.9)@"
                 "2008-10-23 02:53:04+00, SRID=4326;Point(116.31 39.91)@2008-10-23 02:53:10+00]')")
    reader = TrajectoryReader(conn, TemporalSource("moves"))
    assert [t.id for t in reader] == [2]
    assert dict(reader.report.rejected) == {"coordinates out of range": 1}
    assert reader.report.examples["coordinates out of range"] == [1]
    tok = Tokenizer.fit(TRIPS, TokenizerConfig(resolution=9, min_count=1)).to_json()
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="latitude 95.0 of fix 1 is out of range"):
        conn.execute("SELECT count(*) FROM moves, pgtraj.tokenize(trip, %s) WHERE id = 1", [tok])


def test_bad_rows_are_rejected_with_reasons_and_ids(conn):
    conn.execute("CREATE TABLE bad (id text, geom geometry)")
    conn.execute("""INSERT INTO bad VALUES
        ('ok', 'SRID=4326;LINESTRING M (116.3 39.9 1224730384, 116.31 39.91 1224730390)'),
        ('null', NULL),
        ('empty', 'SRID=4326;LINESTRING EMPTY'),
        ('nom', 'SRID=4326;LINESTRING (116.3 39.9, 116.31 39.91)'),
        ('nosrid', 'LINESTRING M (116.3 39.9 1224730384, 116.31 39.91 1224730390)'),
        ('ms', 'SRID=4326;LINESTRING M (116.3 39.9 1224730384000, 116.31 39.91 1224730390000)'),
        ('range', 'SRID=4326;LINESTRING M (116.3 95 1224730384, 116.31 39.91 1224730390)'),
        ('nan', ST_SetSRID(ST_MakeLine(ST_MakePointM(116.3, 'NaN', 1224730384), ST_MakePointM(116.3, 39.9, 1224730390)), 4326)),
        ('point', 'SRID=4326;POINT M (116.3 39.9 1224730384)'),
        ('single', 'SRID=4326;LINESTRING M (116.3 39.9 1224730384, 116.3 39.9 1224730384)'),
        ('backwards', 'SRID=4326;LINESTRING M (116.3 39.9 1224730390, 116.31 39.91 1224730384)')""")
    reader = TrajectoryReader(conn, LineStringSource("bad"))
    got = {t.id for t in reader}
    # duplicate and backwards M are readable; cleaning handles (and counts) them
    assert got == {"ok", "single", "backwards"}
    assert reader.report.examples == {
        "NULL geometry": ["null"], "empty geometry": ["empty"], "no M (time) coordinate": ["nom"],
        "no SRID (read with srid=..., or ST_SetSRID in the table)": ["nosrid"],
        "M in milliseconds, not seconds": ["ms"], "coordinates out of range": ["range"],
        "NaN or infinite value": ["nan"], "not a LINESTRING": ["point"]}
    assert "8 rejected" not in reader.report.summary() and "ms" in reader.report.summary()
    (ms,) = TrajectoryReader(conn, QuerySource("SELECT id, geom FROM bad WHERE id = 'ms'"), time_unit="ms")
    assert ms.t.tolist() == [1224730384.0, 1224730390.0]
    with pytest.raises(TrajectoryError, match="'null': NULL geometry"):
        list(TrajectoryReader(conn, QuerySource("SELECT id, geom FROM bad ORDER BY id = 'null' DESC"), on_error="raise"))


def test_query_with_no_rows_and_broken_sources(conn):
    load_lines(conn, TRIPS[:1])
    with pytest.raises(SourceError, match="returned no trajectories"):
        list(TrajectoryReader(conn, QuerySource("SELECT id, geom FROM trips WHERE false")))
    with pytest.raises(SourceError, match="does not exist"):
        list(TrajectoryReader(conn, LineStringSource("no_such_table")))
    conn.rollback()
    with pytest.raises(SourceError, match="is text; expected timestamptz"):
        conn.execute("CREATE TABLE f (id int, ts text, lat float8, lon float8)")
        list(TrajectoryReader(conn, PointSource("f", lat="lat", lon="lon")))


def test_identifiers_are_quoted_not_injected(conn):
    load_lines(conn, TRIPS[:1])
    evil = 'trips; DROP TABLE trips; --'
    with pytest.raises(SourceError, match="does not exist"):
        list(TrajectoryReader(conn, LineStringSource(evil)))
    conn.rollback()
    conn.execute('CREATE TABLE "we""ird table" ("the id" int, "geo m" geometry)')
    conn.execute('INSERT INTO "we""ird table" SELECT id, geom FROM trips')
    (tr,) = TrajectoryReader(conn, LineStringSource('we"ird table', geom="geo m", id="the id"))
    assert_same(tr, TRIPS[0])
    assert conn.execute("SELECT count(*) FROM trips").fetchone()[0] == 1


def test_million_point_trajectory(conn):
    n = 1_000_000
    conn.execute("""CREATE TABLE big AS SELECT 1 AS id, ST_SetSRID(ST_MakeLine(
                        ST_MakePointM(116.3 + i * 1e-6, 39.9 + i * 1e-6, 1224730384 + i) ORDER BY i), 4326) AS geom
                      FROM generate_series(0, %s) AS i""" % (n - 1))
    (tr,) = TrajectoryReader(conn, LineStringSource("big"))
    assert len(tr) == n and tr.t[-1] - tr.t[0] == n - 1
    x = Tokenizer.fit([tr], TokenizerConfig(resolution=9, min_count=1)).encode(tr)
    assert len(x) > 100 and x.interpolated.sum() == 0  # a slow straight walk: neighbours only


def sql_tokens(conn, where: str, tokenizer: Tokenizer, column="geom", table="trips") -> Tokens:
    rows = conn.execute(f"SELECT t.* FROM {table}, pgtraj.tokenize({column}, %s::jsonb) AS t WHERE {where} ORDER BY pos",
                        [tokenizer.to_json()]).fetchall()
    cols = list(zip(*rows))
    return Tokens(tokens=np.array(cols[1], np.int32), cells=np.array([h3.str_to_int(c) for c in cols[2]], np.uint64),
                  t=np.array(cols[3], np.float64), dwell=np.array(cols[4], np.float32), dt=np.array(cols[5], np.float32),
                  dow=np.array(cols[6], np.int8), minute=np.array(cols[7], np.int16),
                  offset=np.stack([np.array(cols[8], np.float32), np.array(cols[9], np.float32)], axis=1),
                  speed=np.array(cols[10], np.float32), heading=np.array(cols[11], np.float32),
                  interpolated=np.array(cols[12], bool), move=np.array(cols[13], np.int8),
                  alt=np.full(len(rows), np.nan, np.float32))  # pgtraj.tokenize shows no altitude: these have none


def test_database_tokenizes_byte_identically_to_the_client(conn):
    load_lines(conn, TRIPS)
    tok = Tokenizer.fit(TRIPS[:8], TokenizerConfig(resolution=10, min_count=2, timezone="Asia/Shanghai"))
    for tr in TRIPS:
        in_db = sql_tokens(conn, f"id = {tr.id}", tok)
        wkb = conn.execute("SELECT ST_AsBinary(geom) FROM trips WHERE id = %s", [tr.id]).fetchone()[0]
        client = tok.encode(from_wkb(tr.id, wkb))
        for f in Tokens.FIELDS:  # field by field first, so a failure names what differs
            a, b = getattr(in_db, f), getattr(client, f)
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), (tr.id, f, a[a != b][:3], b[a != b][:3])
        assert in_db.to_bytes() == client.to_bytes()


def test_tokenize_tgeompoint_overload_matches(conn):
    # whole-second times: MobilityDB keeps microseconds, so fractional float seconds would round
    load_lines(conn, TRIPS[:2])
    conn.execute("""CREATE TABLE whole AS SELECT id, ST_SetSRID(ST_MakeLine(ST_MakePointM(ST_X(d.geom), ST_Y(d.geom),
                        round(ST_M(d.geom))) ORDER BY d.path), 4326) AS geom
                      FROM trips, ST_DumpPoints(geom) d GROUP BY id""")
    conn.execute("CREATE TABLE moves AS SELECT id, tgeompointSeq(array_agg(tgeompoint(ST_Force2D(d.geom),"
                 " to_timestamp(ST_M(d.geom))) ORDER BY d.path)) AS trip FROM whole, ST_DumpPoints(geom) d GROUP BY id")
    tok = Tokenizer.fit(TRIPS, TokenizerConfig(resolution=9, min_count=1))
    a = sql_tokens(conn, "id = 1", tok, table="whole")
    b = sql_tokens(conn, "id = 1", tok, column="trip", table="moves")
    assert len(a) > 5 and a.to_bytes() == b.to_bytes()


def test_tokenize_bad_input_in_sql(conn):
    tok = Tokenizer.fit(TRIPS, TokenizerConfig(resolution=9, min_count=1)).to_json()
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="no M \\(time\\) coordinate"):
        conn.execute("SELECT * FROM pgtraj.tokenize('SRID=4326;LINESTRING(1 2, 3 4)'::geometry, %s)", [tok])
    conn.rollback()
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="milliseconds"):
        conn.execute("SELECT * FROM pgtraj.tokenize('SRID=4326;LINESTRING M(1 2 1224730384000, 3 4 1224730390000)'::geometry, %s)", [tok])
    conn.rollback()
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="not a pgtraj tokenizer"):
        conn.execute("SELECT * FROM pgtraj.tokenize('SRID=4326;LINESTRING M(1 2 3, 3 4 5)'::geometry, '{}')")
    conn.rollback()
    # SRID 0 is read as WGS84, as by every other function; an SRID PostGIS does not know is a clear 22023
    tokens = "SELECT array_agg(cell::text ORDER BY pos) FROM pgtraj.tokenize(%s::geometry, %s)"
    assert conn.execute(tokens, ["LINESTRING M(116.3 39.9 1224730384, 116.4 39.9 1224730390)", tok]).fetchone() == \
        conn.execute(tokens, ["SRID=4326;LINESTRING M(116.3 39.9 1224730384, 116.4 39.9 1224730390)", tok]).fetchone()
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="unknown SRID 990000"):
        conn.execute(tokens, ["SRID=990000;LINESTRING M(1 2 1224730384, 3 4 1224730390)", tok])
    conn.rollback()
    assert conn.execute("SELECT count(*) FROM pgtraj.tokenize(NULL::geometry, %s)", [tok]).fetchone()[0] == 0
