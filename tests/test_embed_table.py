"""CALL pgtraj.embed_table: batches committed one by one, incremental refresh, a bad row recorded and the
rest kept, cancel keeps finished batches, wrong shapes and names refused with SQL errors."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from .test_inference import LINE, models, register  # noqa: F401  (models: the module's fixture)
from .test_model import TRIPS

N = 40


def fill(c, table="trips", n=N, key="id"):
    for i, t in enumerate(TRIPS[:n]):
        c.execute(f"INSERT INTO {table} ({key}, geom) VALUES (%s, {LINE})",
                  [i + 1, t.lon.tolist(), t.lat.tolist(), t.t.tolist()])


@pytest.fixture
def conn(db, models):  # noqa: F811
    with psycopg.connect(db, autocommit=True) as c:
        register(c, models[0])
        c.execute("CREATE TABLE trips (id int PRIMARY KEY, geom geometry(LineStringM, 4326), embedding vector(32))")
        fill(c)
        yield c


def notices(c):
    got = []
    c.add_notice_handler(lambda d: got.append(d.message_primary))
    return got


def test_fills_the_column_in_committed_batches(conn):
    said = notices(conn)
    conn.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm', batch_size => 16)")
    assert conn.execute("SELECT count(*) FROM trips WHERE embedding IS NOT NULL AND embedding_model IS NOT NULL"
                        ).fetchone() == (N,)
    same = conn.execute("SELECT bool_and(embedding <-> pgtraj.embed(geom, 'm') < 1e-5) FROM trips").fetchone()[0]
    assert same
    progress = [m for m in said if "rows/s" in m]
    assert len(progress) == 3 and progress[-1].startswith(f"pgtraj.embed_table trips.embedding: {N}/{N}")
    status, done, total = conn.execute("SELECT status, done, total FROM pgtraj.job_status").fetchone()
    assert (status, done, total) == ("succeeded", N, N)


def test_refresh_redoes_only_missing_and_stale_rows(conn, db, models):  # noqa: F811
    conn.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm')")
    conn.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm')")
    assert conn.execute("SELECT total FROM pgtraj.jobs ORDER BY id DESC LIMIT 1").fetchone() == (0,)
    conn.execute("UPDATE trips SET embedding = NULL WHERE id <= 3")
    conn.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm')")
    assert conn.execute("SELECT total FROM pgtraj.jobs ORDER BY id DESC LIMIT 1").fetchone() == (3,)
    register(conn, models[1])  # v2 deployed: every row is stale now
    conn.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm')")
    v2 = conn.execute("SELECT id FROM pgtraj.model_registry WHERE version = 2").fetchone()[0]
    assert conn.execute("SELECT count(*) FROM trips WHERE embedding_model = %s", [v2]).fetchone() == (N,)


def test_spacetime_aspect_fills_a_wider_column(conn):
    """aspect => 'spacetime': the route vector and the time code, as pgtraj.embed gives them, in a column 32
    dimensions wider; a column of the other width is refused before any row is read."""
    conn.execute("ALTER TABLE trips ADD COLUMN st vector(64)")
    conn.execute("CALL pgtraj.embed_table('trips', 'geom', 'st', 'm', aspect => 'spacetime')")
    same = conn.execute("SELECT count(*), bool_and(st <-> pgtraj.embed(geom, 'm', 'spacetime') < 1e-5) FROM trips"
                        " WHERE st IS NOT NULL").fetchone()
    assert same == (N, True)
    for column, aspect, width in (("st", "route", 32), ("embedding", "spacetime", 64)):
        with pytest.raises(psycopg.Error) as err:
            conn.execute(f"CALL pgtraj.embed_table('trips', 'geom', '{column}', 'm', aspect => '{aspect}')")
        assert err.value.sqlstate == "42804" and f"embeds in {width} dimensions" in str(err.value)
    with pytest.raises(psycopg.Error) as err:
        conn.execute("CALL pgtraj.embed_table('trips', 'geom', 'st', 'm', aspect => 'when')")
    assert err.value.sqlstate == "22023" and "aspect must be one of route, spacetime" in str(err.value)


def test_a_bad_row_is_recorded_and_the_rest_kept(conn):
    conn.execute("UPDATE trips SET geom = ST_SetSRID(ST_MakeLine(ST_MakePointM(116.3, 95, 1e9),"
                 " ST_MakePointM(116.4, 95, 1e9 + 60)), 4326) WHERE id = 7")  # latitude 95
    said = notices(conn)
    conn.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm', batch_size => 10)")
    assert conn.execute("SELECT count(*) FROM trips WHERE embedding IS NOT NULL").fetchone() == (N - 1,)
    key, state, error = conn.execute("SELECT key, sqlstate, error FROM pgtraj.embedding_errors").fetchone()
    assert (key, state) == ("7", "22023") and "latitude 95" in error
    assert any("1 row(s) could not be embedded" in m for m in said)
    conn.execute("UPDATE trips SET geom = (SELECT geom FROM trips WHERE id = 8) WHERE id = 7")
    conn.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm')")
    assert conn.execute("SELECT count(*) FROM pgtraj.embedding_errors").fetchone() == (0,)  # repaired: forgotten


def test_cancel_keeps_finished_batches_and_resumes(conn, db):
    conn.execute("INSERT INTO trips SELECT id + 1000, geom FROM trips")
    conn.execute("INSERT INTO trips SELECT id + 2000, geom FROM trips")
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    errors = []

    def run():
        try:
            conn.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm', batch_size => 2)")
        except psycopg.Error as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    with psycopg.connect(db, autocommit=True) as other:
        deadline = time.time() + 60
        while other.execute("SELECT count(*) FROM trips WHERE embedding IS NOT NULL").fetchone()[0] < 6:
            assert time.time() < deadline
            time.sleep(0.05)
        other.execute("SELECT pg_cancel_backend(%s)", [pid])
        worker.join(60)
        kept = other.execute("SELECT count(*) FROM trips WHERE embedding IS NOT NULL").fetchone()[0]
        assert errors and errors[0].sqlstate == "57014"
        assert 6 <= kept < 4 * N  # 4N rows: N, +N copies, +2N copies
        assert other.execute("SELECT status FROM pgtraj.job_status").fetchone() == ("cancelled",)
    conn.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm', batch_size => 50)")
    assert conn.execute("SELECT total FROM pgtraj.jobs ORDER BY id DESC LIMIT 1").fetchone() == (4 * N - kept,)
    assert conn.execute("SELECT count(*) FROM trips WHERE embedding IS NULL").fetchone() == (0,)


@pytest.mark.parametrize("setup, call, sqlstate, words", [
    ("ALTER TABLE trips ALTER COLUMN embedding TYPE vector(3) USING NULL",
     "CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm')", "42804", "embeds in 32 dimensions"),
    ("ALTER TABLE trips DROP CONSTRAINT trips_pkey",
     "CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm')", "42P10", "primary key"),
    ("", "CALL pgtraj.embed_table('trips', 'geom', 'nope', 'm')", "42703", "column 'nope'"),
    ("", "CALL pgtraj.embed_table('trips', 'id', 'embedding', 'm')", "42804", "not a trajectory"),
    ("", "CALL pgtraj.embed_table('trips', 'geom', 'id', 'm')", "42804", "not a pgvector vector"),
    ("", "CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'nope')", "42704", "no model named"),
    ("", "CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm', batch_size => 0)", "22023", "batch_size"),
    ("", "CALL pgtraj.embed_table('trips; DROP TABLE trips', 'geom', 'embedding', 'm')", "42602", "invalid name"),
    ("", "CALL pgtraj.embed_table('trips', 'geom\"; DROP TABLE trips; --', 'embedding', 'm')", "42703", "does not exist"),
])
def test_refusals(conn, setup, call, sqlstate, words):
    if setup:
        conn.execute(setup)
    with pytest.raises(psycopg.Error) as err:
        conn.execute(call)
    assert err.value.sqlstate == sqlstate and words in str(err.value), str(err.value)
    assert conn.execute("SELECT count(*) FROM trips").fetchone() == (N,)  # nothing dropped


def test_odd_identifiers_are_quoted(conn):
    conn.execute('CREATE TABLE "Odd Trips" ("Key" text PRIMARY KEY, geom geometry(LineStringM, 4326),'
                 ' "emb; x" vector(32))')
    conn.execute('INSERT INTO "Odd Trips" SELECT \'k\' || id, geom FROM trips')
    conn.execute("""CALL pgtraj.embed_table('"Odd Trips"', 'geom', 'emb; x', 'm')""")
    assert conn.execute('SELECT count("emb; x_model") FROM "Odd Trips" WHERE "emb; x" IS NOT NULL').fetchone() == (N,)


def test_a_role_without_update_rights_cannot_fill(conn, db, login_role):
    dsn = login_role("pgtraj_user")(db)
    conn.execute("GRANT SELECT ON trips TO pgtraj_user")  # may read the table, not write it
    conn.execute("ALTER TABLE trips ADD COLUMN embedding_model bigint")
    with psycopg.connect(dsn, autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm')")
    assert conn.execute("SELECT count(embedding) FROM trips").fetchone() == (0,)


def test_one_run_per_column_at_a_time(conn, db):
    with psycopg.connect(db, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtext('pgtraj.embed_table'),"
                      " hashtext('trips'::regclass::oid || '.embedding'))")
        with pytest.raises(psycopg.Error) as err:
            conn.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm')")
        assert err.value.sqlstate == "55P03"


def line(points: list[tuple], srid: int = 4326) -> str:
    return f"ST_SetSRID(ST_MakeLine(ARRAY[{', '.join(f'ST_MakePointM({x}, {y}, {m})' for x, y, m in points)}]), {srid})"


# rows no model can read, whatever refuses them: the runtime (times no calendar has, time running backwards,
# a latitude off the globe) or PostGIS before the runtime sees them (an SRID it does not know)
BAD_ROWS = {
    7: (line([(116.3, 95, 1e9), (116.4, 95, 1e9 + 60)]), "latitude 95"),
    8: (line([(116.3, 39.9, -1.25e11), (116.4, 39.9, -1.25e11 + 60)]), "year from 1 to 9999"),
    9: (line([(116.3, 39.9, 1e20), (116.4, 39.9, 1e20 + 60)]), "milliseconds"),
    10: (line([(116.3, 39.9, 1e9 + 60), (116.4, 39.9, 1e9)]), "time (M) goes backwards at fix 2"),
    11: (line([(116.3, 39.9, 1e9), (116.4, 39.9, 1e9)]), "all 2 fixes have the same time"),
    12: (line([(116.3, 39.9, 1e9), (116.4, 39.9, 1e9 + 60)], srid=990000), "unknown SRID 990000"),
}


def spoil(c) -> None:
    c.execute("ALTER TABLE trips ALTER COLUMN geom TYPE geometry")  # any SRID, as a user's table may hold
    for key, (geom, _) in BAD_ROWS.items():
        c.execute(f"UPDATE trips SET geom = {geom} WHERE id = %s", [key])


def test_one_bad_row_of_any_kind_never_stalls_a_batch(conn):
    spoil(conn)
    for run in (1, 2):  # and the next run does not stop at the same rows either
        conn.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm', batch_size => 8)")
        assert conn.execute("SELECT count(*) FROM trips WHERE embedding IS NOT NULL").fetchone() == (N - len(BAD_ROWS),)
        errors = {int(k): (s, e, n) for k, s, e, n in conn.execute(
            "SELECT key, sqlstate, error, attempts FROM pgtraj.embedding_errors").fetchall()}
        assert sorted(errors) == sorted(BAD_ROWS)
        for key, (_, words) in BAD_ROWS.items():
            state, error, attempts = errors[key]
            assert state == "22023" and words in error and attempts == run, (key, errors[key])
            assert f"'{key}'" in error or "SRID" in error  # named by its key, not its place in the batch
        assert conn.execute("SELECT status FROM pgtraj.job_status ORDER BY id DESC LIMIT 1").fetchone() == ("succeeded",)


def test_embed_table_says_where_it_cannot_run(conn, db):
    with psycopg.connect(db) as c:  # a transaction block: batches could not be committed
        with pytest.raises(psycopg.Error) as err:
            c.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm')")
        assert err.value.sqlstate == "2D000"
        assert "transaction block" in err.value.diag.message_primary and "autocommit" in err.value.diag.message_hint
    assert conn.execute("SELECT count(*) FROM pgtraj.jobs").fetchone() == (0,)


def test_racing_first_runs_on_a_new_column(conn, db):
    """Two first runs at once: one fills, the other is told another run is filling the column (55P03),
    never a duplicate-column error from adding embedding_model twice."""
    conn.execute("INSERT INTO trips SELECT id + 1000, geom FROM trips")
    conn.execute("INSERT INTO trips SELECT id + 2000, geom FROM trips")
    errors = []

    def run():
        try:
            with psycopg.connect(db, autocommit=True) as c:
                c.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm', batch_size => 4)")
        except psycopg.Error as exc:
            errors.append(exc.sqlstate)

    workers = [threading.Thread(target=run) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert errors in ([], ["55P03"]), errors
    assert conn.execute("SELECT count(embedding) FROM trips").fetchone() == (4 * N,)


def test_tables_keyed_by_uuid_are_filled_kept_fresh_and_searched(conn):
    """Keys of any type: a uuid-keyed table is embedded, kept fresh by a target, and searched; similar() names
    rows by their key as text, similar_rows returns them with the uuid as it is."""
    conn.execute("CREATE TABLE voyages (voyage uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
                 " geom geometry(LineStringM, 4326), embedding vector(32))")
    conn.execute("INSERT INTO voyages (geom) SELECT geom FROM trips WHERE id <= 10")
    conn.execute("CALL pgtraj.embed_table('voyages', 'geom', 'embedding', 'm')")
    assert conn.execute("SELECT count(*) FROM voyages WHERE embedding IS NULL").fetchone() == (0,)
    conn.execute("SELECT pgtraj.create_embedding_target('voyages', 'voyages', 'geom', 'embedding', 'm')")
    new = conn.execute("INSERT INTO voyages (geom) SELECT geom FROM trips WHERE id = 11 RETURNING voyage"
                       ).fetchone()[0]
    conn.execute("CALL pgtraj.process_queue('voyages')")
    assert conn.execute("SELECT embedding IS NOT NULL FROM voyages WHERE voyage = %s", [new]).fetchone() == (True,)
    (key,) = conn.execute("SELECT s.id FROM voyages v, pgtraj.similar('voyages', 'embedding', v.embedding, 1) s"
                          " WHERE v.voyage = %s", [new]).fetchone()
    assert key == str(new)
    row = conn.execute("SELECT r.voyage, pg_typeof(r.voyage)::text FROM voyages v, LATERAL pgtraj.similar_rows("
                       "NULL::voyages, 'embedding', v.embedding, 1) r WHERE v.voyage = %s", [new]).fetchone()
    assert row == (new, "uuid")


def test_workers_need_pg_cron_and_a_sane_count(conn):
    """workers => n starts n - 1 pg_cron sessions: in a database pg_cron does not serve that is refused with
    the way out, before a job is opened; the count is checked first."""
    with pytest.raises(psycopg.Error) as err:
        conn.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm', workers => 0)")
    assert err.value.sqlstate == "22023" and "workers must be from 1 to 64" in str(err.value)
    with pytest.raises(psycopg.Error) as err:
        conn.execute("CALL pgtraj.embed_table('trips', 'geom', 'embedding', 'm', workers => 2)")
    assert err.value.sqlstate == "0A000" and "pg_cron is not enabled" in str(err.value)
    assert "without workers" in err.value.diag.message_hint
    assert conn.execute("SELECT count(embedding) FROM trips").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM pgtraj.jobs").fetchone() == (0,)
