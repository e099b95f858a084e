"""Inference in queries: pgtraj.embed / predict_next / score / similarity against the same model run by the
client (torch), the session cache following deployments, parallel query, and every bad input the SQL API
must answer with an SQL error (SQLSTATE + hint), never a crash."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import psycopg
import pytest
import torch

from pgtraj.core.features import collate, to_inputs
from pgtraj.core.tokenizer import JUMP
from pgtraj.core.trajectory import haversine_m
from pgtraj.db import registry
from pgtraj.learn.batches import Batches, to_tensors
from pgtraj.learn.export import export
from pgtraj.learn.tasks import OBJECTIVES
from pgtraj.learn.tasks.next_cell import NextCell

from .test_model import TOK, TRIPS, make_model

DEFAULT_GRAPHS = OBJECTIVES["next_cell"].graphs

LINE = ("ST_SetSRID(ST_MakeLine(ARRAY(SELECT ST_MakePointM(x, y, m) FROM unnest(%s::float8[], %s::float8[],"
        " %s::float8[]) AS u(x, y, m))), 4326)")


def trained(seed: int):
    torch.manual_seed(seed)
    model = make_model(seed=seed)
    obj, data = NextCell(model), Batches(TRIPS, TOK, batch_size=8, max_len=48, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(15):
        loss, _ = obj.loss(data.next())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def models():
    return [trained(1), trained(2)]


def register(conn, model, name="m", deploy=True, graphs=DEFAULT_GRAPHS):
    example = to_tensors(collate([to_inputs(TOK.encode(t)) for t in TRIPS[:2]]))
    mv = registry.register(conn, name, objective="next_cell", tokenizer=json.loads(TOK.to_json()),
                           artifacts={k: export(model, k, example) for k in graphs},
                           config={"train": {"max_len": 48}, "model": model.cfg.to_dict()},
                           embedding_dim=model.cfg.d_model)
    if deploy:
        registry.deploy(conn, name, mv.version)
    return mv


@pytest.fixture
def conn(db, models):
    with psycopg.connect(db, autocommit=True) as c:
        register(c, models[0])
        c.execute("CREATE TABLE trips (id int PRIMARY KEY, geom geometry(LineStringM, 4326))")
        for t in TRIPS[:12]:
            c.execute(f"INSERT INTO trips VALUES (%s, {LINE})", [t.id, t.lon.tolist(), t.lat.tolist(), t.t.tolist()])
        yield c


def client_embed(model, trips) -> np.ndarray:
    with torch.no_grad():
        return model.embed(**to_tensors(collate([to_inputs(TOK.encode(t)) for t in trips]))).numpy()


def vec(text: str) -> np.ndarray:
    return np.array(json.loads(text))


def test_embed_matches_the_client_model(conn, models):
    rows = conn.execute("SELECT id, pgtraj.embed(geom, 'm')::text FROM trips ORDER BY id").fetchall()
    want = client_embed(models[0], TRIPS[:12])
    got = np.stack([vec(e) for _, e in rows])
    assert got.shape == (12, models[0].cfg.d_model)
    assert np.abs(got - want).max() < 1e-5 and np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_batch_embed_keeps_order_and_nulls(conn):
    single = dict(conn.execute("SELECT id, pgtraj.embed(geom, 'm')::text FROM trips").fetchall())
    ids = [5, 2, 9]
    (batch,) = conn.execute(
        "SELECT pgtraj.embed(ARRAY(SELECT geom FROM trips WHERE id = ANY(%s) ORDER BY array_position(%s, id))"
        " || ARRAY[NULL::geometry], 'm')::text[]", [ids, ids]).fetchone()
    assert batch[-1] is None and len(batch) == 4
    for i, e in zip(ids, batch):
        assert np.abs(vec(e) - vec(single[i])).max() < 1e-6


def test_tgeompoint_and_any_srid(conn):
    a, b, c = conn.execute("""
        SELECT pgtraj.embed(geom, 'm')::text,
               pgtraj.embed(tgeompointSeq(ARRAY(SELECT tgeompoint(ST_Force2D(d.geom), to_timestamp(ST_M(d.geom)))
                                                FROM ST_DumpPoints(geom) d ORDER BY ST_M(d.geom))), 'm')::text,
               pgtraj.embed(ST_Transform(geom, 3857), 'm')::text
          FROM trips WHERE id = 3""").fetchone()
    assert np.abs(vec(a) - vec(c)).max() < 1e-4  # the projection round trip moves fixes by nanometres
    assert float(vec(a) @ vec(b)) > 0.99  # MobilityDB drops collinear fixes; the trip is the same


def test_similarity_is_the_cosine_of_embeddings(conn):
    s_self, s_other, a, b = conn.execute("""
        SELECT pgtraj.similarity(x.geom, x.geom, 'm'), pgtraj.similarity(x.geom, y.geom, 'm'),
               pgtraj.embed(x.geom, 'm')::text, pgtraj.embed(y.geom, 'm')::text
          FROM trips x, trips y WHERE x.id = 1 AND y.id = 7""").fetchone()
    assert abs(s_self - 1.0) < 1e-6 and abs(s_other - float(vec(a) @ vec(b))) < 1e-5


def client_next_step(model, trip):
    x = TOK.encode(trip)
    with torch.no_grad():
        h, move_logits, dt = model.next_step(**to_tensors(collate([to_inputs(x)])))
    return x, h, move_logits, dt


def test_predict_next_names_grid_neighbours_by_the_move_head(conn, models):
    import h3

    from pgtraj.core.tokenizer import move_frames

    rows = conn.execute("SELECT rank, cell::text, ST_X(geom), ST_Y(geom), probability, expected_seconds"
                        " FROM pgtraj.predict_next((SELECT geom FROM trips WHERE id = 4), 'm', k => 8)").fetchall()
    x, _, move_logits, dt = client_next_step(models[0], TRIPS[4])
    p = torch.softmax(move_logits[0, -1], -1).numpy()
    frame = move_frames(x.cells)[-1]
    slots = [s for s in np.argsort(-p[:6], kind="stable") if frame[s]]
    assert [r[0] for r in rows] == list(range(1, len(slots) + 1))  # at most the six neighbours: k = 8 gives 6
    assert [r[1] for r in rows] == [h3.int_to_str(int(frame[s])) for s in slots]
    assert np.allclose([r[4] for r in rows], p[slots], atol=1e-5)
    # the model's time to the next cell, shared out by each neighbour's distance from the last fix: the
    # probability-weighted mean is the model's figure, and a nearer neighbour is entered sooner
    trip = TRIPS[4]
    dist = np.array([haversine_m(trip.lat[-1], trip.lon[-1], r[3], r[2]) for r in rows])
    seconds = np.array([r[5] for r in rows])
    assert np.isclose(np.sum(p[slots] * seconds) / np.sum(p[slots]), np.expm1(dt[0, -1].item()), rtol=1e-4)
    assert np.allclose(seconds / dist, seconds[0] / dist[0], rtol=1e-6) and len(set(seconds.round(3))) > 1
    here = h3.int_to_str(int(x.cells[-1]))
    assert all(h3.grid_distance(here, r[1]) == 1 for r in rows)
    lat, lon = h3.cell_to_latlng(rows[0][1])
    assert abs(rows[0][2] - lon) < 1e-9 and abs(rows[0][3] - lat) < 1e-9


def test_a_trip_outside_the_vocabulary_gets_neighbours_and_a_notice(conn):
    """Where the vocabulary knows no cell (another region), predictions are the trip's own grid neighbours,
    never a known cell far away, and a NOTICE says that they rest on motion alone."""
    import h3

    trip = TRIPS[4]
    said = []
    conn.add_notice_handler(lambda d: said.append((d.message_primary, d.message_hint)))
    rows = conn.execute(f"SELECT cell::text, probability FROM pgtraj.predict_next({LINE}, 'm', k => 6)",
                        [(trip.lon - 120.0).tolist(), trip.lat.tolist(), trip.t.tolist()]).fetchall()
    last = h3.latlng_to_cell(float(trip.lat[-1]), float(trip.lon[-1]) - 120.0, 9)
    assert rows and all(h3.grid_distance(last, c) == 1 for c, _ in rows)
    assert abs(sum(p for _, p in rows) - 1.0) < 0.5  # most of the mass is on the six neighbours
    assert any("0% of this trip's cells are in the vocabulary of \"m\" v1" in m and "fine-tune" in h for m, h in said), said
    said.clear()
    conn.execute("SELECT count(*) FROM pgtraj.predict_next((SELECT geom FROM trips WHERE id = 4), 'm')")
    assert not said  # a trip the vocabulary knows: nothing to say


def test_a_next_cell_graph_is_served_over_the_vocabulary(conn, models):
    """A model registered with the vocabulary graph (next_cell, as every model of pgtraj 0.1 was) is served
    by the same functions: the k likeliest tokens, grid neighbours first when constrained."""
    import h3

    register(conn, models[0], name="vocab", graphs=("encoder", "next_cell"))
    rows = conn.execute("SELECT rank, cell::text, probability, expected_seconds FROM pgtraj.predict_next("
                        "(SELECT geom FROM trips WHERE id = 4), 'vocab', k => 8, constrained => false)").fetchall()
    x, h, _, dt = client_next_step(models[0], TRIPS[4])
    with torch.no_grad():
        p = torch.softmax(models[0].lm_head(h[0, -1]), -1).numpy()
    p[:5] = -1
    want = np.argsort(-p)[:8]
    assert [r[0] for r in rows] == list(range(1, 9))
    assert [r[1] for r in rows] == [h3.int_to_str(TOK.token_cell(int(t))) for t in want]
    assert np.allclose([r[2] for r in rows], p[want], atol=1e-5)
    assert np.allclose([r[3] for r in rows], np.expm1(dt[0, -1].item()), rtol=1e-4)
    cons = conn.execute("SELECT cell::text FROM pgtraj.predict_next((SELECT geom FROM trips WHERE id = 4), 'vocab',"
                        " k => 3)").fetchall()
    here = h3.int_to_str(int(x.cells[-1]))
    assert all(h3.grid_distance(here, c) <= 1 for (c,) in cons)
    path = conn.execute("SELECT ST_X(d.geom), ST_Y(d.geom) FROM ST_DumpPoints(pgtraj.predict_path((SELECT geom"
                        " FROM trips WHERE id = 4), 'vocab', steps => 4)) d ORDER BY d.path").fetchall()
    cells = [h3.latlng_to_cell(lat, lon, 9) for lon, lat in path[1:]]  # after the last fix: cell centres
    assert len(cells) == 4 and h3.grid_distance(here, cells[0]) == 1
    assert all(h3.grid_distance(a, b) == 1 for a, b in zip(cells, cells[1:]))


def test_score_is_the_mean_surprise_of_the_moves(conn, models):
    (got,) = conn.execute("SELECT pgtraj.score(geom, 'm') FROM trips WHERE id = 6").fetchone()
    x, _, move_logits, _ = client_next_step(models[0], TRIPS[6])
    logp = torch.log_softmax(move_logits[0, :-1], -1)
    nxt = torch.from_numpy(np.asarray(to_inputs(x).move[1:], dtype=np.int64))
    has = nxt <= JUMP
    want = -logp.gather(-1, nxt.clamp_max(JUMP)[:, None]).squeeze(-1)[has].mean().item()
    assert has.sum() >= len(nxt) - 1 and abs(got - want) < 1e-4


def test_graphs_of_pgtraj_0_1_are_still_served(conn):
    """Models registered before moves existed have graphs with four inputs (no move) and a next_cell graph:
    they load, and every function serves them."""
    from .graphs import legacy

    mv = registry.register(conn, "old", objective="next_cell", tokenizer=json.loads(TOK.to_json()),
                           artifacts={k: legacy(k) for k in ("encoder", "next_cell", "token_nll")},
                           config={"train": {"max_len": 48}}, embedding_dim=make_model().cfg.d_model)
    registry.deploy(conn, "old", mv.version)
    emb, score = conn.execute("SELECT pgtraj.embed(geom, 'old')::text, pgtraj.score(geom, 'old') FROM trips"
                              " WHERE id = 4").fetchone()
    assert np.isclose(np.linalg.norm(vec(emb)), 1.0, atol=1e-5) and score > 0
    rows = conn.execute("SELECT rank, probability FROM pgtraj.predict_next((SELECT geom FROM trips WHERE id = 4),"
                        " 'old', k => 5)").fetchall()
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5] and all(0 <= r[1] <= 1 for r in rows)


def test_redeploy_is_seen_without_reconnecting(conn, db, models):
    before = conn.execute("SELECT pgtraj.embed(geom, 'm')::text FROM trips WHERE id = 1").fetchone()[0]
    with psycopg.connect(db, autocommit=True) as other:
        register(other, models[1], deploy=True)  # v2, deployed from another session
    after, v2, v1 = conn.execute("SELECT pgtraj.embed(geom, 'm')::text, pgtraj.embed(geom, 'm@2')::text,"
                                 " pgtraj.embed(geom, 'm@1')::text FROM trips WHERE id = 1").fetchone()
    assert after == v2 and v1 == before and after != before
    conn.execute("SELECT pgtraj.deploy('m', 'rollback')")
    assert conn.execute("SELECT pgtraj.embed(geom, 'm')::text FROM trips WHERE id = 1").fetchone()[0] == before


def test_parallel_query_runs_the_functions_in_workers(conn):
    conn.execute("INSERT INTO trips SELECT id + 100, geom FROM trips")
    for k, v in {"parallel_setup_cost": 0, "parallel_tuple_cost": 0, "min_parallel_table_scan_size": 0,
                 "max_parallel_workers_per_gather": 2, "force_parallel_mode": "on"}.items():
        conn.execute(f"SET {k} = {v!r}" if isinstance(v, str) else f"SET {k} = {v}")
    q = "SELECT id, pgtraj.embed(geom, 'm')::text FROM trips WHERE pgtraj.score(geom, 'm') > 0"
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + q).fetchall())
    assert "Gather" in plan
    par = dict(conn.execute(q).fetchall())
    conn.execute("SET max_parallel_workers_per_gather = 0")
    conn.execute("SET force_parallel_mode = off")
    assert par == dict(conn.execute(q).fetchall()) and len(par) == 24


def test_warmup_and_threads(conn):
    info = conn.execute("SELECT pgtraj.warmup('m')").fetchone()[0]
    assert info["graphs"] == sorted(DEFAULT_GRAPHS) and info["threads"] == 1 and info["version"] == 1
    conn.execute("SET pgtraj.threads = 2")
    assert conn.execute("SELECT pgtraj.warmup('m')").fetchone()[0]["threads"] == 2
    a = conn.execute("SELECT pgtraj.embed(geom, 'm')::text FROM trips WHERE id = 2").fetchone()[0]
    conn.execute("SET pgtraj.threads = 1")
    assert np.abs(vec(a) - vec(conn.execute("SELECT pgtraj.embed(geom, 'm')::text FROM trips WHERE id = 2")
                                .fetchone()[0])).max() < 1e-6


@pytest.mark.parametrize("query, sqlstate, words", [
    ("SELECT pgtraj.embed(geom, 'nope') FROM trips LIMIT 1", "42704", "no model named 'nope'"),
    ("SELECT pgtraj.embed(geom, 'm@7') FROM trips LIMIT 1", "42704", "has no version 7"),
    ("SELECT pgtraj.embed(geom, 'bad name!') FROM trips LIMIT 1", "22023", "invalid model name"),
    ("SELECT pgtraj.embed(geom, 'undeployed') FROM trips LIMIT 1", "55000", "no deployed version"),
    ("SELECT pgtraj.score(geom, 'noscore') FROM trips LIMIT 1", "0A000", "has no 'token_nll' graph"),
    ("SELECT pgtraj.embed('SRID=4326;POINT M (116.3 39.9 1224720000)'::geometry, 'm')", "22023", "expected a LINESTRING"),
    ("SELECT pgtraj.embed('SRID=4326;LINESTRING (116.3 39.9, 116.4 39.9)'::geometry, 'm')", "22023", "no M"),
    ("SELECT pgtraj.embed('LINESTRING M (500000 4400000 1224720000, 500100 4400000 1224720060)'::geometry, 'm')",
     "22023", "out of range"),
    ("SELECT pgtraj.embed('SRID=4326;LINESTRING M EMPTY'::geometry, 'm')", "22023", "no points"),
    ("SELECT pgtraj.embed('SRID=4326;POLYGON((116 39, 117 39, 117 40, 116 39))'::geometry, 'm')", "22023",
     "expected a LINESTRING, got POLYGON"),
    ("SELECT pgtraj.embed('SRID=4326;LINESTRING M (116.3 39.9 1224720060, 116.4 39.9 1224720000)'::geometry, 'm')",
     "22023", "time (M) goes backwards at fix 2"),
    ("SELECT pgtraj.embed('SRID=4326;LINESTRING M (116.3 39.9 1224720000, 116.4 39.9 1224720000)'::geometry, 'm')",
     "22023", "all 2 fixes have the same time"),
    ("SELECT pgtraj.embed('SRID=4326;LINESTRING M (116.3 39.9 1224720000, 116.4 95 1224720060)'::geometry, 'm')",
     "22023", "latitude 95.0 of fix 2 is out of range"),
    ("SELECT pgtraj.embed('SRID=990000;LINESTRING M (1 2 1224720000, 3 4 1224720060)'::geometry, 'm')", "22023",
     "unknown SRID 990000"),
    ("SELECT pgtraj.score('SRID=4326;LINESTRING M (116.3 39.9 1224720000, 116.30001 39.9 1224720060)'::geometry, 'm')",
     "22023", "too short to score"),
    ("SELECT * FROM pgtraj.predict_next((SELECT geom FROM trips LIMIT 1), 'm', k => 0)", "22023", "k must be"),
    ("SET pgtraj.threads = 'many'; SELECT pgtraj.embed(geom, 'm') FROM trips LIMIT 1", "22023", "pgtraj.threads"),
])
def test_bad_input_is_an_sql_error(conn, models, query, sqlstate, words):
    register(conn, models[0], name="undeployed", deploy=False)
    register(conn, models[0], name="noscore", graphs=("encoder", "next_cell"))
    with pytest.raises(psycopg.Error) as err:
        for q in query.split("; "):
            conn.execute(q)
    assert err.value.sqlstate == sqlstate and words in str(err.value), str(err.value)
    assert err.value.diag.message_hint or sqlstate == "22023"
    clean_error(err.value)
    assert conn.execute("SELECT 1").fetchone() == (1,)  # the backend is alive


def clean_error(err: psycopg.Error) -> None:
    """An expected error reads as pgtraj's own: no Python exception class in the message, no literal
    'None' hint, and no frame of the runtime in CONTEXT (PL/Python only shows the line of the function
    body that reported it)."""
    d = err.diag
    assert d.message_primary.startswith("pgtraj: ") and not re.search(r"plpy\.|spiexceptions|Error:", d.message_primary)
    assert d.message_hint != "None" and d.message_detail != "None"
    frames = re.findall(r'PL/Python function "[^"]+", line \d+, in (\S+)', d.context or "")
    assert frames in ([], ["<module>"]), d.context


def test_null_in_null_out(conn):
    assert conn.execute("SELECT pgtraj.embed(NULL::geometry, 'm'), pgtraj.score(NULL::geometry, 'm'),"
                        " (SELECT count(*) FROM pgtraj.predict_next(NULL::geometry, 'm'))").fetchone() == (None, None, 0)


def test_declared_volatility_and_parallel_safety(conn):
    rows = dict(conn.execute("""
        SELECT p.oid::regprocedure::text, p.provolatile::text || p.proparallel::text || p.proisstrict::int
          FROM pg_proc p WHERE p.pronamespace = 'pgtraj'::regnamespace
           AND p.proname IN ('embed', 'predict_next', 'score', 'similarity', 'warmup')""").fetchall())
    assert rows["pgtraj.warmup(text)"] == "sr1"
    assert all(v == "ss1" for k, v in rows.items() if not k.startswith("pgtraj.warmup")), rows


def test_parallel_workers_load_models_from_the_file_mirror(conn):
    import shutil
    from pathlib import Path

    cache = Path(conn.execute("SELECT current_setting('data_directory')").fetchone()[0]) / "pgtraj_cache"
    (sha,) = conn.execute("SELECT sha256 FROM pgtraj.model_artifacts WHERE kind = 'encoder'").fetchone()
    assert (cache / f"{sha}.onnx").exists()  # written when the model was registered
    shutil.rmtree(cache)
    parallel = ("SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0;"
                " SET force_parallel_mode = on")
    for q in parallel.split("; "):
        conn.execute(q)
    query = "SELECT count(pgtraj.embed(geom, 'm')) FROM trips"
    with pytest.raises(psycopg.Error) as err:
        conn.execute(query)
    assert err.value.sqlstate == "55000" and "pgtraj.warmup" in err.value.diag.message_hint
    conn.execute("SET force_parallel_mode = off")
    conn.execute("SELECT pgtraj.warmup('m')")  # outside parallel mode: fetches and mirrors again
    conn.execute("SET force_parallel_mode = on")
    assert conn.execute(query).fetchone() == (12,)


def test_predict_path_is_a_contiguous_timed_continuation(conn):
    import h3

    n, first, m_inc, cells = conn.execute("""
        WITH p AS (SELECT pgtraj.predict_path(geom, 'm', steps => 6, beam => 3) AS g FROM trips WHERE id = 4)
        SELECT ST_NPoints(g), ST_AsText(ST_StartPoint(g)) = ST_AsText(ST_Force2D(ST_EndPoint(t.geom)))
                 OR ST_Equals(ST_Force2D(ST_StartPoint(g)), ST_Force2D(ST_EndPoint(t.geom))),
               bool_and(ST_M(d.geom) > lag_m OR d.path[1] = 1), array_agg(h3_lat_lng_to_cell(ST_Force2D(d.geom)::point, 9)::text ORDER BY d.path)
          FROM p, trips t, LATERAL (SELECT dp.geom, dp.path, coalesce(lag(ST_M(dp.geom)) OVER (ORDER BY dp.path),
                                           ST_M(dp.geom)) AS lag_m FROM ST_DumpPoints(p.g) dp) d
         WHERE t.id = 4 GROUP BY 1, 2""").fetchone()
    assert n == 7 and first and m_inc
    steps = cells[1:]
    assert all(h3.grid_distance(a, b) == 1 for a, b in zip(steps, steps[1:]))  # one grid move per step
    assert all(a != c for a, c in zip(cells, cells[2:]))  # never straight back: no A, B, A alternation


def test_predict_destination_needs_a_destination_head(conn, models):
    with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
        conn.execute("SELECT * FROM pgtraj.predict_destination((SELECT geom FROM trips WHERE id = 1), 'm')")
    assert "destination" in err.value.diag.message_hint
    register(conn, models[0], name="dest", graphs=("encoder", "destination"))
    rows = conn.execute("SELECT rank, probability FROM pgtraj.predict_destination((SELECT geom FROM trips"
                        " WHERE id = 1), 'dest', k => 4)").fetchall()
    x = TOK.encode(TRIPS[1])
    with torch.no_grad():
        logits = models[0].destination_logits(**to_tensors(collate([to_inputs(x)])))
    p = torch.softmax(logits[0, -1], -1).numpy()
    p[:5] = -1
    assert [r[0] for r in rows] == [1, 2, 3, 4] and np.allclose([r[1] for r in rows], np.sort(p)[::-1][:4], atol=1e-5)


def sparse_fill(conn, model, name: str, key: int):
    """fill_gaps_detail rows of TRIPS[9] with only every 12th fix kept (cells in between are skipped), its
    tokens, the skipped positions, and the model's logits there as the client computes them (every skipped
    cell masked, what gives a masked cell away hidden, as in training)."""
    from pgtraj.core.tokenizer import MASK
    from pgtraj.learn.tasks.masked_spans import hide_masked

    sparse = TRIPS[9].take(slice(0, None, 12))
    conn.execute(f"INSERT INTO trips VALUES (%s, {LINE})", [key, sparse.lon.tolist(), sparse.lat.tolist(),
                                                            sparse.t.tolist()])
    rows = conn.execute("SELECT ST_Y(geom), ST_X(geom), ST_M(geom), filled, probability FROM pgtraj.fill_gaps_detail("
                        "(SELECT geom FROM trips WHERE id = %s), %s)", [key, name]).fetchall()
    x = TOK.encode(sparse)
    gaps = np.flatnonzero(x.interpolated)
    assert len(gaps) > 0 and sum(r[3] for r in rows) == len(gaps) and sum(not r[3] for r in rows) == len(sparse)
    assert all(a[2] <= b[2] for a, b in zip(rows, rows[1:]))
    b = to_tensors(collate([to_inputs(x)]))
    b["tokens"][0, gaps + 1] = MASK
    masked = torch.zeros_like(b["tokens"], dtype=torch.bool)
    masked[0, gaps + 1] = True
    cont, move = hide_masked(b["cont"], b["move"], masked)
    with torch.no_grad():
        logits = model.lm_head(model.hidden(b["tokens"], b["dow"], b["minute"], cont, move))
    return rows, x, gaps, logits[0]


def test_fill_gaps_gives_each_gaps_expected_places_like_the_client(conn, models):
    """A masked_logp graph: each position of a run of skipped cells becomes its expected place over the
    contiguous grid paths between the fixes around it, with the probability of the cell it lies in
    (core.gaps.expected_positions on the model's log-probabilities, as the client computes them); every
    place is within its position's reach of both ends."""
    import h3.api.numpy_int as h3i

    from pgtraj.core.gaps import expected_positions

    register(conn, models[0], name="gapper", graphs=("encoder", "masked_logp"))
    rows, x, gaps, logits = sparse_fill(conn, models[0], "gapper", 502)
    logp = torch.log_softmax(logits, -1).numpy()
    want_at, want_p, reach = {}, {}, {}
    for run in np.split(gaps, np.flatnonzero(np.diff(gaps) > 1) + 1):
        i, j = int(run[0]), int(run[-1]) + 1
        points, probs = expected_positions(int(x.cells[i - 1]), int(x.cells[j]), len(run) + 1, TOK.lookup,
                                           logp[run + 1])
        for n, k in enumerate(run.tolist()):
            want_at[k], want_p[k], reach[k] = points[n], probs[n], (int(x.cells[i - 1]), n + 1, int(x.cells[j]),
                                                                   len(run) - n)
    filled = [r for r in rows if r[3]]
    assert np.allclose([r[:2] for r in filled], [want_at[g] for g in gaps.tolist()], atol=1e-6)
    assert np.allclose([r[4] for r in filled], [want_p[g] for g in gaps.tolist()], atol=1e-4)
    assert all(0 <= r[4] <= 1 for r in filled) and any(r[4] > 0.5 for r in filled)
    for r, g in zip(filled, gaps.tolist()):
        a, to_a, b, to_b = reach[g]
        cell = h3i.latlng_to_cell(r[0], r[1], 9)
        assert h3i.grid_distance(a, cell) <= to_a + 1 and h3i.grid_distance(cell, b) <= to_b + 1


def test_fill_gaps_serves_a_masked_graph_of_0_2_0_like_the_client(conn, models):
    import h3

    register(conn, models[0], name="mlm", graphs=("encoder", "masked"))
    rows, x, gaps, logits = sparse_fill(conn, models[0], "mlm", 500)
    logits[..., :5] = -torch.inf
    model_cells = [h3.cell_to_latlng(h3.int_to_str(TOK.token_cell(int(t)))) for t in logits[gaps + 1].argmax(-1)]
    path_cells = [h3.cell_to_latlng(h3.int_to_str(int(c))) for c in x.cells[gaps]]
    filled = [r for r in rows if r[3]]  # in time order, as the gaps
    for r, m, p in zip(filled, model_cells, path_cells):  # the model's cell, or the path's when it is too far
        assert np.allclose(r[:2], m if r[4] is not None else p, atol=1e-9)
    line = conn.execute("SELECT ST_NPoints(pgtraj.fill_gaps(geom, 'mlm')) FROM trips WHERE id = 500").fetchone()[0]
    assert line == len(rows)


def test_fill_gaps_never_jumps_further_than_the_gap(conn, models):
    import h3

    register(conn, models[1], name="mlm2", graphs=("encoder", "masked"))
    sparse = TRIPS[11].take(slice(0, None, 15))
    conn.execute(f"INSERT INTO trips VALUES (501, {LINE})", [sparse.lon.tolist(), sparse.lat.tolist(), sparse.t.tolist()])
    rows = conn.execute("SELECT ST_Y(geom), ST_X(geom), filled, probability FROM pgtraj.fill_gaps_detail("
                        "(SELECT geom FROM trips WHERE id = 501), 'mlm2')").fetchall()
    x = TOK.encode(sparse)
    path = [h3.int_to_str(int(c)) for c in x.cells[x.interpolated]]
    filled = [h3.latlng_to_cell(r[0], r[1], 9) for r in rows if r[2]]
    longest = max(len(run) for run in "".join("1" if f else "0" for f in x.interpolated).split("0"))
    assert all(h3.grid_distance(a, b) <= longest for a, b in zip(sorted(filled), sorted(path)))
    assert all((r[3] is None) or 0 < r[3] <= 1 for r in rows if r[2])


def test_spacetime_embeddings_tell_when_as_well_as_where(conn, models):
    """The route embedding of a trip moved by 3 days is the same vector; its spacetime embedding is the route
    part (weighted) and a time code (core.aspects), so the moved trip is less similar, the same trip at the
    same time is identical, and the cosine is the weighted mean of route and time agreement."""
    from pgtraj.core.aspects import TIME_CODE_DIM, TIME_PERIODS_S, TIME_WEIGHT

    t = TRIPS[4]
    moved = t.t + 3 * 86_400 + 5_000
    a, b, sa, sb, sim = conn.execute(
        f"WITH x AS (SELECT {LINE} AS a, {LINE} AS b) SELECT pgtraj.embed(a, 'm')::text, pgtraj.embed(b, 'm')::text,"
        " pgtraj.embed(a, 'm', 'spacetime')::text, pgtraj.embed(b, 'm', 'spacetime')::text,"
        " pgtraj.similarity(a, b, 'm', 'spacetime') FROM x",
        [t.lon.tolist(), t.lat.tolist(), t.t.tolist(), t.lon.tolist(), t.lat.tolist(), moved.tolist()]).fetchone()
    a, b, sa, sb = map(vec, (a, b, sa, sb))
    d = models[0].cfg.d_model
    assert len(a) == d and len(sa) == d + TIME_CODE_DIM
    assert np.abs(a - b).max() < 1e-6  # a route embedding never sees absolute time
    assert np.allclose(sa[:d], np.sqrt(1 - TIME_WEIGHT) * a, atol=1e-6) and abs(np.linalg.norm(sa) - 1) < 1e-5
    dt = moved - t.t
    agreement = np.mean([np.cos(2 * np.pi * dt[i] / p) for i in (0, -1) for p in TIME_PERIODS_S])
    assert abs(sim - ((1 - TIME_WEIGHT) + TIME_WEIGHT * agreement)) < 1e-4 and sim < 0.95
    assert abs(float(sa @ sb) - sim) < 1e-5
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT pgtraj.embed(geom, 'm', 'time') FROM trips LIMIT 1")
    assert err.value.sqlstate == "22023" and "'route': where a trip goes" in err.value.diag.message_hint


def test_point_arrays_are_a_trajectory_too(conn):
    t = TRIPS[6]
    got, want = conn.execute(
        "SELECT pgtraj.embed(array_agg(ST_SetSRID(ST_MakePoint(x, y), 4326) ORDER BY m DESC),"
        "                    array_agg(to_timestamp(m) ORDER BY m DESC), 'm')::text,"
        "       (SELECT pgtraj.embed(geom, 'm')::text FROM trips WHERE id = 6)"
        "  FROM unnest(%s::float8[], %s::float8[], %s::float8[]) AS u(x, y, m)",
        [t.lon.tolist(), t.lat.tolist(), t.t.tolist()]).fetchone()
    assert np.abs(vec(got) - vec(want)).max() < 1e-6  # fixes in any order: sorted by time
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT pgtraj.embed(ARRAY['SRID=4326;POINT(116 39)'::geometry], ARRAY[now(), now()], 'm')")
    assert err.value.sqlstate == "22023"


P = "'SRID=4326;POINT(116.3 39.9)'::geometry"


@pytest.mark.parametrize("points, times, words", [
    ("ARRAY['SRID=4326;POINT EMPTY'::geometry]", "ARRAY[now()]", "fix 1 of the trajectory cannot be used: it is an empty point"),
    (f"ARRAY[{P}, NULL]", "ARRAY[now(), now() + interval '1 min']", "fix 2 of the trajectory cannot be used: its point is NULL"),
    (f"ARRAY[{P}, {P}]", "ARRAY[now(), NULL]", "fix 2 of the trajectory cannot be used: its time is NULL"),
    ("ARRAY['SRID=4326;LINESTRING(0 0, 1 1)'::geometry]", "ARRAY[now()]", "fix 1 of the trajectory cannot be used: it is a LINESTRING"),
    (f"ARRAY[{P}, 'SRID=3857;POINT(0 0)'::geometry]", "ARRAY[now(), now()]", "its SRID is 3857, the first fix's 4326"),
])
def test_point_arrays_refuse_fixes_they_cannot_use(conn, points, times, words):
    """A NULL or foreign fix is an error naming it, never a fix dropped from the trajectory."""
    with pytest.raises(psycopg.Error) as err:
        conn.execute(f"SELECT pgtraj.embed({points}, {times}, 'm')")
    assert err.value.sqlstate == "22023" and words in err.value.diag.message_primary
    assert err.value.diag.message_hint


def test_length_batches_cover_every_sequence_once_within_the_token_budget():
    from pgtraj.runtime.encoding import length_batches

    lengths = np.random.default_rng(0).integers(1, 129, 700).tolist()
    batches = length_batches(lengths, max_tokens=1024, max_rows=64)
    assert sorted(i for b in batches for i in b) == list(range(700))
    for b in batches:
        assert len(b) <= 64 and len(b) * max(lengths[i] for i in b) <= 1024
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.1 * sum(lengths)  # similar lengths share a call
    assert length_batches([5000, 3], max_tokens=1024) == [[1], [0]]  # longer than the budget: alone
    assert length_batches([]) == []


def test_statement_timeout_stops_a_long_trajectory_promptly(conn):
    """A statement_timeout (or cancel) is served inside the runtime's loops, not only when the next query
    runs: a trajectory of 600,000 fixes (~560,000 tokens) that takes seconds to embed stops right after the
    timeout."""
    conn.execute("CREATE TABLE long_trip AS SELECT ST_SetSRID(ST_MakeLine(ST_MakePointM("
                 " 116.3 + 0.003 * (i % 500), 39.9 + 0.003 * (i / 500), 1224720000 + 10 * i)), 4326) AS geom"
                 " FROM generate_series(0, 599999) AS i")
    t0 = time.monotonic()
    conn.execute("SELECT vector_dims(pgtraj.embed(geom, 'm')) FROM long_trip")
    full = time.monotonic() - t0
    conn.execute("SET statement_timeout = '500ms'")
    t0 = time.monotonic()
    with pytest.raises(psycopg.errors.QueryCanceled):
        conn.execute("SELECT pgtraj.embed(geom, 'm') FROM long_trip")
    stopped = time.monotonic() - t0
    conn.execute("RESET statement_timeout")
    assert full > 2.0, f"the input is too small to tell ({full:.2f} s)"
    assert stopped < 0.5 + 0.4 * (full - 0.5), (stopped, full)


def test_the_session_cache_keeps_the_models_in_use(conn):
    """Nine model versions called in turn, three rounds: each graph is loaded once (least recently used
    eviction, never a clear-all), and their shared tokenizer once."""
    from .graphs import TOKENIZER, encoder

    for i in range(9):
        mv = registry.register(conn, f"r{i}", objective="next_cell", tokenizer=TOKENIZER,
                               artifacts={"encoder": encoder(f"r{i}")})
        registry.deploy(conn, f"r{i}", mv.version)
    for _ in range(3):
        for i in range(9):
            conn.execute("SELECT pgtraj.embed(geom, %s) FROM trips WHERE id = 1", [f"r{i}"])
    cache = conn.execute("SELECT pgtraj.runtime_info() -> 'cache'").fetchone()[0]
    assert cache["loads"] == {"models": 1, "sessions": 9}, cache


def test_predict_travel_time_and_classify_serve_their_graphs(conn):
    """Every registered graph kind has its SQL function: travel time and class labels, as the client model
    computes them."""
    model = make_model(seed=6, n_classes=3).eval()
    example = to_tensors(collate([to_inputs(TOK.encode(t)) for t in TRIPS[:2]]))
    mv = registry.register(conn, "heads", objective="classify", tokenizer=json.loads(TOK.to_json()),
                           artifacts={k: export(model, k, example) for k in ("encoder", "travel_time", "classify")},
                           config={"train": {"max_len": 512}, "model": model.cfg.to_dict(),
                                   "classes": ["walk", "bus", "car"]})
    registry.deploy(conn, "heads", mv.version)
    trip = TRIPS[3]
    b = to_tensors(collate([to_inputs(TOK.encode(trip))]))
    with torch.no_grad():
        seconds = float(torch.expm1(model.travel_time(**b))[0])
        probs = torch.softmax(model.classify(**b), -1)[0].numpy()
    (got,) = conn.execute("SELECT pgtraj.predict_travel_time(geom, 'heads') FROM trips WHERE id = 3").fetchone()
    assert abs(got - seconds) < 1e-3 * max(seconds, 1.0)
    rows = conn.execute("SELECT rank, label, probability FROM pgtraj.classify((SELECT geom FROM trips WHERE id = 3),"
                        " 'heads', k => 3)").fetchall()
    order = np.argsort(-probs)
    assert [r[1] for r in rows] == [["walk", "bus", "car"][i] for i in order] and [r[0] for r in rows] == [1, 2, 3]
    assert np.allclose([r[2] for r in rows], probs[order], atol=1e-5)
    with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
        conn.execute("SELECT pgtraj.predict_travel_time(geom, 'm') FROM trips WHERE id = 3")
    assert "travel_time" in err.value.diag.message_hint


def test_every_trajectory_form_reads_the_same(conn):
    """MobilityDB tgeompoint and tgeogpoint and arrays of fixes give each function what the LINESTRING M does."""
    forms = {
        "geometry": "(SELECT geom FROM trips WHERE id = 4)",
        "tgeompoint": "(SELECT tgeompointSeq(array_agg(tgeompoint(ST_Force2D(d.geom), to_timestamp(ST_M(d.geom)))"
                      " ORDER BY d.path)) FROM trips t, ST_DumpPoints(t.geom) d WHERE t.id = 4)",
        "tgeogpoint": "(SELECT tgeogpointSeq(array_agg(tgeogpoint(ST_Force2D(d.geom)::geography,"
                      " to_timestamp(ST_M(d.geom))) ORDER BY d.path)) FROM trips t, ST_DumpPoints(t.geom) d WHERE t.id = 4)",
    }
    points = ("(SELECT array_agg(ST_Force2D(d.geom) ORDER BY d.path) FROM trips t, ST_DumpPoints(t.geom) d WHERE t.id = 4),"
              " (SELECT array_agg(to_timestamp(ST_M(d.geom)) ORDER BY d.path) FROM trips t, ST_DumpPoints(t.geom) d"
              " WHERE t.id = 4)")
    want = {
        "embed": conn.execute(f"SELECT pgtraj.embed({forms['geometry']}, 'm')::text").fetchone()[0],
        "score": conn.execute(f"SELECT round(pgtraj.score({forms['geometry']}, 'm')::numeric, 4)").fetchone()[0],
        "next": conn.execute(f"SELECT array_agg(cell::text ORDER BY rank) FROM pgtraj.predict_next({forms['geometry']},"
                             " 'm', k => 3, constrained => false)").fetchone()[0],
    }
    for form, arg in [("points", points), *((k, v) for k, v in forms.items() if k != "geometry")]:
        got = {
            "embed": conn.execute(f"SELECT pgtraj.embed({arg}, 'm')::text").fetchone()[0],
            "score": conn.execute(f"SELECT round(pgtraj.score({arg}, 'm')::numeric, 4)").fetchone()[0],
            "next": conn.execute(f"SELECT array_agg(cell::text ORDER BY rank) FROM pgtraj.predict_next({arg}, 'm',"
                                 " k => 3, constrained => false)").fetchone()[0],
        }
        if form == "points":  # the very same fixes
            assert got == want, form
        else:  # MobilityDB keeps a subset of collinear fixes: the same trip, nearly the same numbers
            assert got["next"] == want["next"] and float(vec(got["embed"]) @ vec(want["embed"])) > 0.99, form
        assert conn.execute(f"SELECT pgtraj.similarity({arg}, {arg}, 'm')").fetchone()[0] > 0.999, form
