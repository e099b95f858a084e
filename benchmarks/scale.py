"""Single-node scale: 100,000+ real trajectories in one table, measured.

    .venv/bin/pgtraj db start            # or pass --dsn
    .venv/bin/python benchmarks/scale.py [--rows 100000] [--queries 200]

The table bench.scale (id bigint key, geom LINESTRING M, embedding vector(128)) holds every cleaned GeoLife
piece of all 140 users (core.clean, the person profile) and then sliding windows of 64 fixes (stride 32) over
those pieces, in user order, until --rows rows. With the shipped base model (`pgtraj models add base`):
- CALL pgtraj.embed_table: rows/s, against raw onnxruntime on the same rows in this process (the runtime's
  own code, runtime.tasks.encoder.embed_wkbs, one thread) -- the share embed_table reaches;
- pgtraj.create_hnsw_index: build time and index size;
- pgtraj.similar (row_id => q, k => 10) over --queries random rows: latency p50/p99 (client round trip
  included), and recall@10 against exact search (no index) at ef_search 40, 100 and 200;
- the resident memory of the backend that embedded (VmRSS);
- a projection to 10 M rows: embed time and index size grow linearly, HNSW build a little faster than linear.
Writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psycopg

from pgtraj.app import base_model
from pgtraj.core.clean import CleaningOptions, clean
from pgtraj.core.contract import BASE_MODEL
from pgtraj.core.trajectory import to_wkb
from pgtraj.db.cluster import LocalCluster
from pgtraj.db.connection import resolve_dsn
from pgtraj.db.datasets import default_data_dir, read_geolife_files
from pgtraj.db.install import install
from pgtraj.learn.export import example_batch, export
from pgtraj.runtime.tasks.encoder import embed_wkbs


def rows_of(data: Path, n: int) -> list:
    g = read_geolife_files(data)
    config, _ = CleaningOptions(profile="person").resolve([])
    pieces = [p for tr in g.trajectories for p in clean(tr, config)]
    out = list(pieces)
    for p in pieces:
        if len(out) >= n:
            break
        out.extend(p.take(slice(a, a + 64)) for a in range(0, len(p) - 64, 32))
    return out[:n], len(pieces)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn")
    ap.add_argument("--data", default=str(default_data_dir() / "geolife"))
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    t0 = time.perf_counter()
    url = resolve_dsn(args.dsn, None)
    # the local database knows its PL/Python environment; a --dsn database has pgtraj installed already
    install(url, python_path=None if args.dsn else LocalCluster().python_path, log=lambda m: None)
    rows, n_pieces = rows_of(Path(args.data), args.rows)
    results: dict = {"rows": len(rows), "cleaned_pieces": n_pieces, "windows": len(rows) - min(n_pieces, len(rows)),
                     "fixes": int(sum(len(r) for r in rows))}
    print(json.dumps(results), flush=True)
    with psycopg.connect(url, autocommit=True) as conn:
        base_model.add(conn, log=lambda m: None)
        conn.execute("CREATE SCHEMA IF NOT EXISTS bench")
        conn.execute("DROP TABLE IF EXISTS bench.scale")
        conn.execute("CREATE TABLE bench.scale (id bigint PRIMARY KEY, geom geometry(LineStringM, 4326),"
                     " embedding vector(128))")
        t = time.perf_counter()
        with conn.cursor().copy("COPY bench.scale (id, geom) FROM STDIN") as copy:
            for i, r in enumerate(rows):
                copy.write_row((i + 1, to_wkb(r, srid=4326).hex()))
        conn.execute("ANALYZE bench.scale")
        results["load_seconds"] = round(time.perf_counter() - t, 1)
        results["table_bytes"] = conn.execute("SELECT pg_total_relation_size('bench.scale')").fetchone()[0]

        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        t = time.perf_counter()
        conn.execute("CALL pgtraj.embed_table('bench.scale', 'geom', 'embedding', %s, batch_size => 1000)",
                     [BASE_MODEL])
        embed_s = time.perf_counter() - t
        failed = conn.execute("SELECT count(*) FROM pgtraj.embedding_errors WHERE table_name = 'bench.scale'::regclass"
                              ).fetchone()[0]
        results["embed_table"] = {"seconds": round(embed_s, 1), "rows_per_s": round(len(rows) / embed_s, 1),
                                  "rows_refused_into_embedding_errors": failed, "backend_rss_mb": _rss_mb(pid)}
        print(json.dumps(results["embed_table"]), flush=True)

        # the same rows through the runtime's own code and one onnxruntime thread, in this process
        model, tok, card = base_model.load()
        sample = rows[:: max(1, len(rows) // 20_000)]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(export(model, "encoder", example_batch(tok, rows[:4], 128)), opts,
                                    providers=["CPUExecutionProvider"])
        wkbs = [to_wkb(r) for r in sample]
        t = time.perf_counter()
        for i in range(0, len(wkbs), 1000):
            embed_wkbs(tok, card["train"]["max_len"], sess, wkbs[i:i + 1000], skip_errors=True)
        raw = len(wkbs) / (time.perf_counter() - t)
        results["raw_onnxruntime_rows_per_s"] = round(raw, 1)
        results["embed_table_share_of_raw"] = round(results["embed_table"]["rows_per_s"] / raw, 3)

        t = time.perf_counter()
        index = conn.execute("SELECT pgtraj.create_hnsw_index('bench.scale', 'embedding')::text").fetchone()[0]
        results["hnsw"] = {"build_seconds": round(time.perf_counter() - t, 1),
                           "index_bytes": conn.execute("SELECT pg_relation_size(%s::regclass)", [index]).fetchone()[0]}
        print(json.dumps(results["hnsw"]), flush=True)

        rng = np.random.default_rng(0)
        queries = rng.choice(np.arange(1, len(rows) + 1), args.queries, replace=False).tolist()
        exact = {}
        conn.execute("SET enable_indexscan = off")
        for q in queries:
            exact[q] = [r[0] for r in conn.execute(
                "SELECT t.id FROM bench.scale t, bench.scale q WHERE q.id = %s"
                " ORDER BY t.embedding <=> q.embedding LIMIT 10", [q])]
        conn.execute("RESET enable_indexscan")
        search = {}
        for ef in (40, 100, 200):
            took, recall = [], []
            for q in queries:
                t = time.perf_counter()
                got = [int(r[0]) for r in conn.execute(
                    "SELECT id FROM pgtraj.similar('bench.scale', 'embedding', row_id => %s, k => 10, ef_search => %s)",
                    [q, ef])]
                took.append((time.perf_counter() - t) * 1000)
                # similar(row_id) leaves the query row out: compare with the exact top 10 without it
                want = [i for i in exact[q] if i != q][: len(got)]
                recall.append(len(set(got) & set(want)) / max(len(want), 1))
            took.sort()
            search[f"ef_search {ef}"] = {"p50_ms": round(statistics.median(took), 2),
                                         "p99_ms": round(took[int(0.99 * (len(took) - 1))], 2),
                                         "recall@10": round(float(np.mean(recall)), 4)}
            print(ef, search[f"ef_search {ef}"], flush=True)
        results["similar"] = search
    scale = 10_000_000 / len(rows)
    results["projection_to_10M_rows"] = {
        "embed_table_hours": round(embed_s * scale / 3600, 1),
        "table_gb": round(results["table_bytes"] * scale / 1e9, 1),
        "index_gb": round(results["hnsw"]["index_bytes"] * scale / 1e9, 1),
        "hnsw_build_hours_at_least": round(results["hnsw"]["build_seconds"] * scale / 3600, 1),
    }
    results["wall_seconds"] = round(time.perf_counter() - t0)
    path = Path(__file__).parent / "results" / "scale.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


def _rss_mb(pid: int) -> float | None:
    try:
        for line in io.open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None  # another host: not measured
    return None


if __name__ == "__main__":
    main()
