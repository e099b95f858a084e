"""pgtraj.similar and pgtraj.create_hnsw_index: the index is used, results agree with exact search, and
names and bad arguments are handled as SQL errors."""

from __future__ import annotations

import psycopg
import pytest

from .test_embed_table import conn, fill  # noqa: F401  (fixtures: a table of trips and a deployed model 'm')
from .test_inference import models  # noqa: F401


@pytest.fixture
def embedded(conn):  # noqa: F811
    conn.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm')")
    return conn


def exact(c, qid, k):
    return [r[0] for r in c.execute(
        "SELECT t.id::text FROM trips t, trips q WHERE q.id = %s AND t.id <> q.id"
        " ORDER BY (t.embedding <=> q.embedding) + 0 LIMIT %s", [qid, k]).fetchall()]  # + 0: no index


def test_hnsw_index_is_created_and_used(embedded):
    idx = embedded.execute("SELECT pgtraj.create_hnsw_index('trips', 'embedding')::text").fetchone()[0]
    assert idx == "trips_embedding_hnsw"  # regclass prints without the schema on the search path
    assert embedded.execute("SELECT pgtraj.create_hnsw_index('trips', 'embedding')::text").fetchone()[0] == idx
    embedded.execute("SET enable_seqscan = off")
    plan = "\n".join(r[0] for r in embedded.execute(
        "EXPLAIN SELECT id FROM trips ORDER BY embedding <=> (SELECT embedding FROM trips WHERE id = 1) LIMIT 5"))
    assert "trips_embedding_hnsw" in plan


def test_similar_by_id_vector_and_trajectory_agree_with_exact_search(embedded):
    embedded.execute("SELECT pgtraj.create_hnsw_index('trips', 'embedding')")
    by_id = embedded.execute("SELECT id, distance FROM pgtraj.similar('trips', 'embedding', row_id => 3, k => 5)"
                             ).fetchall()
    assert [r[0] for r in by_id] == exact(embedded, 3, 5)  # 40 rows: HNSW search is exact at this size
    assert all(a[1] <= b[1] for a, b in zip(by_id, by_id[1:]))
    by_traj = embedded.execute("SELECT id FROM pgtraj.similar('trips', 'embedding', (SELECT geom FROM trips"
                               " WHERE id = 3), 'm', k => 6)").fetchall()
    assert by_traj[0][0] == "3" and [r[0] for r in by_traj[1:]] == [r[0] for r in by_id]
    as_tgeompoint = ("(SELECT tgeompointSeq(array_agg(tgeompoint(ST_Force2D(d.geom), to_timestamp(ST_M(d.geom)))"
                     " ORDER BY d.path)) FROM trips t, ST_DumpPoints(t.geom) d WHERE t.id = 3)")
    by_temporal = embedded.execute(f"SELECT id FROM pgtraj.similar('trips', 'embedding', {as_tgeompoint}, 'm', k => 1)")
    assert by_temporal.fetchall() == [("3",)]


@pytest.mark.parametrize("call, sqlstate", [
    ("SELECT * FROM pgtraj.similar('trips', 'embedding', row_id => 999)", "P0002"),
    ("SELECT * FROM pgtraj.similar('trips', 'nope', row_id => 1)", "42703"),
    ("SELECT * FROM pgtraj.similar('trips', 'embedding', row_id => 1, k => 0)", "22023"),
    ("SELECT pgtraj.create_hnsw_index('trips', 'geom')", "42804"),
    ("SELECT pgtraj.create_hnsw_index('trips', 'x; DROP TABLE trips')", "42703"),
    ("SELECT pgtraj.create_hnsw_index('trips', 'embedding', m => 1000)", "22023"),
])
def test_refusals(embedded, call, sqlstate):
    with pytest.raises(psycopg.Error) as err:
        embedded.execute(call)
    assert err.value.sqlstate == sqlstate, str(err.value)
    assert embedded.execute("SELECT count(*) FROM trips").fetchone() == (40,)


def test_k_above_ef_search_returns_k_rows_in_distance_order(db):
    """k up to 10,000 as documented: beyond hnsw.ef_search's limit of 1,000, pgvector's iterative scan
    keeps searching the index until k rows are found, in exact distance order."""
    with psycopg.connect(db, autocommit=True) as c:
        c.execute("CREATE TABLE vecs (id int PRIMARY KEY, v vector(16))")
        c.execute("INSERT INTO vecs SELECT i, ARRAY(SELECT sin(i * j + j) FROM generate_series(1, 16) j)::vector(16)"
                  " FROM generate_series(1, 3000) i")
        c.execute("SELECT pgtraj.create_hnsw_index('vecs', 'v')")
        q = "(SELECT v FROM vecs WHERE id = 7)"
        got = c.execute(f"SELECT id::int, distance FROM pgtraj.similar('vecs', 'v', {q}, k => 2000)").fetchall()
        assert len(got) == 2000 and all(a[1] <= b[1] for a, b in zip(got, got[1:]))
        exact = [r[0] for r in c.execute(f"SELECT id FROM vecs ORDER BY (v <=> {q}) + 0 LIMIT 2000").fetchall()]
        recall = len({i for i, _ in got} & set(exact)) / 2000
        assert recall > 0.95, recall
        assert len(c.execute("SELECT * FROM pgtraj.similar('vecs', 'v', row_id => 7, k => 5000)").fetchall()) == 2999


def test_similar_uses_the_index_when_statistics_predate_the_embeddings(db):
    """The usual order, statistics taken while the column was empty, then filled, then indexed: the planner
    believes no row has an embedding. similar() and similar_rows still search through the HNSW index (seen
    in the plans auto_explain sends as NOTICEs), and where they sort instead (no index), rows without an
    embedding never come back."""
    with psycopg.connect(db, autocommit=True) as c:
        c.execute("CREATE TABLE stale (id int PRIMARY KEY, v vector(16)) WITH (autovacuum_enabled = false)")
        c.execute("INSERT INTO stale SELECT i, NULL FROM generate_series(1, 20000) i")  # enough for an index to pay
        c.execute("ANALYZE stale")
        c.execute("UPDATE stale SET v = ARRAY(SELECT sin(id * j + j) FROM generate_series(1, 16) j)::vector(16)"
                  " WHERE id <= 5000")
        assert c.execute("SELECT null_frac FROM pg_stats WHERE tablename = 'stale' AND attname = 'v'").fetchone() == (1,)
        q = "(SELECT v FROM stale WHERE id = 7)"
        got = c.execute(f"SELECT id::int, distance FROM pgtraj.similar('stale', 'v', {q}, k => 10000)").fetchall()
        assert len(got) == 5000 and all(d is not None for _, d in got) and max(i for i, _ in got) == 5000
        rows = c.execute(f"SELECT id FROM pgtraj.similar_rows(NULL::stale, 'v', {q}, 10000)").fetchall()
        assert len(rows) == 5000 and max(i for (i,) in rows) == 5000

        c.execute("SELECT pgtraj.create_hnsw_index('stale', 'v')")
        plans: list[str] = []
        c.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
        c.execute("LOAD 'auto_explain'")
        for setting in ("log_min_duration = 0", "log_nested_statements = on", "log_level = notice"):
            c.execute(f"SET auto_explain.{setting}")
        by_id = c.execute("SELECT id::int FROM pgtraj.similar('stale', 'v', row_id => 7, k => 5)").fetchall()
        rows = c.execute(f"SELECT id FROM pgtraj.similar_rows(NULL::stale, 'v', {q}, 5)").fetchall()
        c.execute("RESET auto_explain.log_min_duration")
        ordered = [p for p in plans if "Order By: (" in p or "Sort Key: (" in p]
        assert len(ordered) >= 2 and all("stale_v_hnsw" in p for p in ordered), plans
        assert len(by_id) == 5 and 7 not in {i for (i,) in by_id} and len(rows) == 5


def test_similar_rows_are_the_tables_own_typed_rows(embedded):
    """similar() names rows by a text id; similar_rows returns the rows themselves, every column typed as the
    table has it, so a caller filters and joins without casts."""
    embedded.execute("SELECT pgtraj.create_hnsw_index('trips', 'embedding')")
    q = "(SELECT embedding FROM trips WHERE id = 3)"
    rows = embedded.execute(f"SELECT r.id, r.id + 1, pg_typeof(r.id)::text FROM pgtraj.similar_rows(NULL::trips,"
                            f" 'embedding', {q}, 6) r").fetchall()
    assert [r[0] for r in rows] == [3, *map(int, exact(embedded, 3, 5))] and rows[0][1:] == (4, "integer")
    by_traj = embedded.execute("SELECT r.id FROM pgtraj.similar_rows(NULL::trips, 'embedding', (SELECT geom FROM"
                               " trips WHERE id = 3), 'm', 6) r").fetchall()
    assert [r[0] for r in by_traj] == [r[0] for r in rows]
    with pytest.raises(psycopg.errors.DatatypeMismatch) as err:
        embedded.execute(f"SELECT * FROM pgtraj.similar_rows(1, 'embedding', {q})")
    assert "row type" in err.value.diag.message_primary and "NULL::" in err.value.diag.message_hint
    with pytest.raises(psycopg.errors.UndefinedColumn):
        embedded.execute(f"SELECT * FROM pgtraj.similar_rows(NULL::trips, 'nope', {q})")
