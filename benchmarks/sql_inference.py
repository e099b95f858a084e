"""Inference inside PostgreSQL against the alternatives, measured side by side in one run.

    .venv/bin/python benchmarks/next_location.py      # first: the checkpoints this registers
    .venv/bin/python benchmarks/sql_inference.py [--dsn URL] [--pieces 3000]

Same model (the hybrid-pretrained small encoder, and the fine-tuned next-cell model), same trajectories
(cleaned GeoLife pieces as LINESTRING M rows in bench.trips), one intra-op thread everywhere:
  * raw onnxruntime outside the database (the limit): the runtime's own code (parse, tokenize, length
    batches; pgtraj.runtime.tasks.encoder.embed_wkbs) with an onnxruntime session in this process;
  * in the database: SELECT pgtraj.embed(array, model) (one batched call) and CALL pgtraj.embed_table
    (which also writes the vectors back, committing per batch);
  * the client round trip a user would write: fetch WKB with psycopg, embed in Python, COPY the vectors
    into a staging table and UPDATE the column from it (embed_table ends with the vectors in the column too);
  * latency of pgtraj.embed and pgtraj.predict_next per call on a warm backend (p50/p99), the first call on
    a new connection, and 8 clients calling pgtraj.embed at once;
  * recall@10 of the HNSW index against exact search.
The four embedding paths run 3 times each, interleaved; the best time of each counts.
Writes benchmarks/results/sql_inference.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psycopg

from pgtraj.app.training import read_split
from pgtraj.core.features import to_inputs
from pgtraj.core.tokenizer import Tokenizer
from pgtraj.core.trajectory import from_wkb
from pgtraj.db import registry
from pgtraj.db.connection import connect, resolve_dsn
from pgtraj.learn.export import example_batch, export_checked
from pgtraj.learn.train import load_checkpoint
from pgtraj.runtime.encoding import BATCH_TOKENS, length_batches, vector_text, windows
from pgtraj.runtime.tasks.encoder import embed_wkbs


def register(conn, name: str, checkpoint: str, objective: str, example_pieces) -> None:
    model, tok, ckpt = load_checkpoint(checkpoint)
    example = example_batch(tok, example_pieces, ckpt["train_config"]["max_len"])
    artifacts, parity = export_checked(model, objective, example)
    mv = registry.register(conn, name, objective=objective, tokenizer=json.loads(tok.to_json()), artifacts=artifacts,
                           config={"train": ckpt["train_config"], "model": ckpt["model_config"]},
                           metrics={"onnx_max_abs_diff": parity}, embedding_dim=model.cfg.d_model)
    registry.deploy(conn, name, mv.version)


def batching(tok, max_len: int, sess, wkbs: list, chunk: int) -> dict:
    """How ONNX calls are cut matters: padded / real tokens when embed_table hands the runtime ``chunk``
    trips at a time, for fixed batches of 256 sequences and for the runtime's token budget, and the time
    of chunks against one call over everything (best of 3)."""
    lengths = []
    for w in wkbs:
        x = to_inputs(tok.encode(from_wkb(None, w)))
        lengths.append([len(s.tokens) for s in windows(x, max_len)])
    real = sum(map(sum, lengths))

    def padded(cut) -> float:
        total = 0
        for k in range(0, len(lengths), chunk):
            ls = [n for trip in lengths[k:k + chunk] for n in trip]
            total += sum(len(b) * max(ls[i] for i in b) for b in cut(ls))
        return round(total / real, 3)

    def timed(size: int) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for k in range(0, len(wkbs), size):
                embed_wkbs(tok, max_len, sess, wkbs[k:k + size])
            best = min(best, time.perf_counter() - t0)
        return round(best, 3)

    fixed = lambda ls: [sorted(range(len(ls)), key=ls.__getitem__)[k:k + 256] for k in range(0, len(ls), 256)]  # noqa: E731
    return {"chunk": chunk, "padded_per_real_token": {"fixed 256 sequences": padded(fixed),
                                                       f"at most {BATCH_TOKENS} padded tokens": padded(length_batches)},
            "seconds": {f"chunks of {chunk}": timed(chunk), "one chunk": timed(len(wkbs))}}


def percentiles(xs: list[float]) -> dict:
    a = np.array(xs) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3),
            "calls": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn")
    ap.add_argument("--pieces", type=int, default=3000)
    ap.add_argument("--embed-checkpoint", default="pgtraj-output/bench/pretrain/checkpoint.pt")
    ap.add_argument("--next-checkpoint", default="pgtraj-output/bench/scratch/checkpoint.pt")
    ap.add_argument("--latency-calls", type=int, default=300)
    args = ap.parse_args()
    dsn = resolve_dsn(args.dsn)
    with connect(dsn, autocommit=True) as conn:
        pieces = [p for s in ("train", "val", "test") for p in read_split(
            conn, "geolife.trajectories", s, id_column="traj_id", traj_column="geom", split_column="split", log=lambda m: None)]
        pieces = pieces[:args.pieces]
        conn.execute("DROP SCHEMA IF EXISTS bench CASCADE")
        conn.execute("CREATE SCHEMA bench")
        conn.execute("CREATE TABLE bench.trips (id int PRIMARY KEY, geom geometry(LineStringM, 4326),"
                     " embedding vector(128))")
        with conn.cursor().copy("COPY bench.trips (id, geom) FROM STDIN") as copy:
            for i, p in enumerate(pieces):
                pts = ",".join(f"{lo!r} {la!r} {t!r}" for la, lo, t in zip(p.lat.tolist(), p.lon.tolist(), p.t.tolist()))
                copy.write_row((i, f"SRID=4326;LINESTRING M ({pts})"))
        conn.execute("ANALYZE bench.trips")
        for name in ("bench-embed", "bench-next"):
            conn.execute("DELETE FROM pgtraj.deployment_log WHERE model_name = %s", [name])
            conn.execute("DELETE FROM pgtraj.model_registry WHERE name = %s", [name])
        register(conn, "bench-embed", args.embed_checkpoint, "hybrid", pieces)
        register(conn, "bench-next", args.next_checkpoint, "next_cell", pieces)
        n_fixes = sum(len(p) for p in pieces)
    out = {"pieces": len(pieces), "fixes": n_fixes, "threads": 1}

    # raw onnxruntime, outside the database (the limit): same WKB, the runtime's own embedding code ---------
    with connect(dsn) as conn:
        wkbs = [bytes(w) for (w,) in conn.execute("SELECT pgtraj._wkb(geom) FROM bench.trips ORDER BY id")]
        mv = registry.load(conn, "bench-embed")
    tok = Tokenizer.from_json(json.dumps(mv.tokenizer))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    sess = ort.InferenceSession(mv.artifacts["encoder"], opts, providers=["CPUExecutionProvider"])
    max_len = mv.config["train"]["max_len"]

    def raw() -> np.ndarray:
        return np.stack(embed_wkbs(tok, max_len, sess, wkbs)[0])

    def in_db_select(conn) -> np.ndarray:
        (arr,) = conn.execute("SELECT pgtraj.embed(array_agg(geom ORDER BY id), 'bench-embed')::text[]"
                              " FROM bench.trips").fetchone()
        return arr

    def in_db_table(conn) -> None:
        conn.execute("CALL pgtraj.embed_table('bench.trips', 'geom', 'embedding', 'bench-embed', batch_size => 500)")

    moved = [0]  # payload bytes the round trip sends over the connection (geometries out, vectors back)

    def round_trip(conn) -> None:
        """What a user would write: fetch, embed in Python, COPY into a staging table, UPDATE the column."""
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE client_embeddings (id int PRIMARY KEY, embedding vector(128))"
                         " ON COMMIT DROP")
            rows = conn.execute("SELECT id, ST_AsBinary(ST_Transform(geom, 4326)) FROM bench.trips"
                                " ORDER BY id").fetchall()
            emb, _ = embed_wkbs(tok, max_len, sess, [bytes(w) for _, w in rows])
            with conn.cursor().copy("COPY client_embeddings (id, embedding) FROM STDIN") as copy:
                for (i, _), e in zip(rows, emb):
                    copy.write_row((i, vector_text(e)))
            moved[0] = sum(len(w) for _, w in rows) + sum(len(vector_text(e)) for e in emb)
            conn.execute("UPDATE bench.trips t SET embedding = c.embedding FROM client_embeddings c"
                         " WHERE t.id = c.id")

    # best of 3, the four ways interleaved so that a noisy moment on this shared machine hits all of them
    best = {k: float("inf") for k in ("raw", "select", "table", "round_trip")}
    with connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pgtraj.warmup('bench-embed')")
        for _ in range(3):
            for key, fn in (("raw", raw), ("select", lambda: in_db_select(conn)), ("table", lambda: in_db_table(conn)),
                            ("round_trip", lambda: round_trip(conn))):
                if key == "table":  # embed_table does only rows without an embedding (of this model)
                    conn.execute("UPDATE bench.trips SET embedding = NULL")
                    conn.execute("VACUUM bench.trips")
                t0 = time.perf_counter()
                result = fn()
                best[key] = min(best[key], time.perf_counter() - t0)
                if key == "raw":
                    ref = result
                elif key == "select":
                    got = np.array([json.loads(v) for v in result])
    raw_s, batch_s, table_s, roundtrip_s = best["raw"], best["select"], best["table"], best["round_trip"]
    parity = float(np.abs(got - ref).max())

    n = len(pieces)
    out["embedding_throughput_traj_per_s"] = {
        "raw onnxruntime outside the database (parse + tokenize + embed)": round(n / raw_s, 1),
        "in the database, SELECT pgtraj.embed(array)": round(n / batch_s, 1),
        "in the database, CALL pgtraj.embed_table (with writes)": round(n / table_s, 1),
        "client round trip (psycopg fetch, embed, COPY to staging, UPDATE)": round(n / roundtrip_s, 1),
    }
    out["ratios"] = {"embed(array) / raw onnxruntime": round(raw_s / batch_s, 3),
                     "embed_table / raw onnxruntime": round(raw_s / table_s, 3),
                     "embed_table vs client round trip (speed-up)": round(roundtrip_s / table_s, 3)}
    out["client_round_trip_payload"] = {
        "megabytes": round(moved[0] / 1e6, 1), "bytes_per_trajectory": round(moved[0] / n),
        "seconds_on_a_1_gbit_link": round(moved[0] * 8 / 1e9, 2), "seconds_on_a_100_mbit_link": round(moved[0] * 8 / 1e8, 2)}
    out["max_abs_diff_in_db_vs_client"] = parity
    out["batching"] = batching(tok, max_len, sess, wkbs, chunk=500)

    # latency on a warm backend, first call on a new connection ------------------------------------------------
    ids = np.random.default_rng(0).integers(0, n, args.latency_calls).tolist()
    lat = {}
    with connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pgtraj.warmup('bench-embed'), pgtraj.warmup('bench-next')")
        for name, q in (("embed", "SELECT pgtraj.embed(geom, 'bench-embed') FROM bench.trips WHERE id = %s"),
                        ("predict_next", "SELECT count(*) FROM pgtraj.predict_next((SELECT geom FROM bench.trips"
                                         " WHERE id = %s), 'bench-next', k => 5)")):
            times = []
            for i in ids:
                t0 = time.perf_counter()
                conn.execute(q, [i]).fetchall()
                times.append(time.perf_counter() - t0)
            lat[name] = percentiles(times)
    first = []
    for i in range(5):
        t0 = time.perf_counter()
        with psycopg.connect(dsn) as c:
            c.execute("SELECT pgtraj.embed(geom, 'bench-embed') FROM bench.trips WHERE id = %s", [i]).fetchone()
        first.append(time.perf_counter() - t0)
    lat["first call on a new connection (connect + load + embed)"] = {"median_ms": round(1000 * statistics.median(first), 1)}
    out["latency"] = lat

    # 8 clients at once ------------------------------------------------------------------------------------
    errors, done = [], [0]

    def client(seed: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                for i in np.random.default_rng(seed).integers(0, n, 100).tolist():
                    c.execute("SELECT pgtraj.embed(geom, 'bench-embed') FROM bench.trips WHERE id = %s", [i]).fetchone()
                    done[0] += 1
        except Exception as exc:  # counted, not raised: the point is to see whether any happen
            errors.append(repr(exc))

    workers = [threading.Thread(target=client, args=(s,)) for s in range(8)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out["concurrency"] = {"clients": 8, "calls": done[0], "errors": len(errors), "error_examples": errors[:3],
                          "calls_per_s": round(done[0] / (time.perf_counter() - t0), 1)}

    # HNSW recall@10 against exact search --------------------------------------------------------------------
    with connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pgtraj.create_hnsw_index('bench.trips', 'embedding')")
        hits, total = 0, 0
        queries = np.random.default_rng(1).choice(n, min(200, n), replace=False).tolist()
        for q in queries:
            approx = {r for (r,) in conn.execute("SELECT id FROM pgtraj.similar('bench.trips', 'embedding', row_id => %s,"
                                                 " k => 10)", [q])}
            exact = {r for (r,) in conn.execute(
                "SELECT t.id::text FROM bench.trips t, bench.trips s WHERE s.id = %s AND t.id <> s.id"
                " ORDER BY (t.embedding <=> s.embedding) + 0 LIMIT 10", [q])}
            hits, total = hits + len(approx & exact), total + 10
        out["hnsw_recall@10"] = {"recall": round(hits / total, 4), "queries": len(queries), "m": 16, "ef_construction": 64,
                                 "ef_search": 100}
    path = Path(__file__).parent / "results" / "sql_inference.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
