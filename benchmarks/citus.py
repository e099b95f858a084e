"""pgtraj on Citus, measured on one host: embed_table and similar() with 1, 2 and 4 workers against the
single-node install, on the same rows, in one run.

    .venv/bin/python benchmarks/citus.py [--rows 20000] [--queries 100] [--workers 1 2 4]

Each setting is a fresh local cluster (pgtraj.db.cluster: `pgtraj db start --workers N`; 0 = no Citus)
under one temporary directory, sharing one PL/Python environment; pgtraj is installed on it and the shipped
base model added. The rows are the first --rows of benchmarks/scale.py's table (cleaned GeoLife pieces,
then sliding windows of them), loaded into bench.trips, distributed by id with 4 shards per worker.
Measured in each:
- CALL pgtraj.embed_table (batch_size 1000): rows/s, and the ratio to the single node;
- pgtraj.create_hnsw_index: build seconds (per-shard indexes on Citus, built on the workers);
- pgtraj.similar (row_id => q, k => 10) over --queries random rows: latency p50/p99 (client round trip
  included) and recall@10 against exact search without an index on the same cluster.
Every node is on this host, so the workers share its cores: with 2 cores, embed_table cannot gain more than
about 2x however many workers there are, and each extra worker adds its own model load per round.
Writes benchmarks/results/citus.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).parent))
from scale import rows_of  # noqa: E402  (benchmarks/ is not a package: the same rows as scale.py)

from pgtraj.app import base_model  # noqa: E402
from pgtraj.core.contract import BASE_MODEL  # noqa: E402
from pgtraj.core.trajectory import to_wkb  # noqa: E402
from pgtraj.db.cluster import LocalCluster  # noqa: E402
from pgtraj.db.datasets import default_data_dir  # noqa: E402
from pgtraj.db.install import install  # noqa: E402

SHARDS_PER_WORKER = 4


def measure(cluster: LocalCluster, rows: list, workers: int, queries: list[int]) -> dict:
    install(cluster.url(), python_path=cluster.python_path, log=lambda m: None)
    out: dict = {"workers": workers}
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        base_model.add(conn, log=lambda m: None)
        conn.execute("CREATE SCHEMA bench")
        conn.execute("CREATE TABLE bench.trips (id bigint PRIMARY KEY, geom geometry(LineStringM, 4326),"
                     " embedding vector(128))")
        if workers:
            conn.execute("SELECT create_distributed_table('bench.trips', 'id', shard_count => %s)",
                         [SHARDS_PER_WORKER * workers])
        with conn.cursor().copy("COPY bench.trips (id, geom) FROM STDIN") as copy:
            for i, r in enumerate(rows):
                copy.write_row((i + 1, to_wkb(r, srid=4326).hex()))
        conn.execute("ANALYZE bench.trips")

        t = time.perf_counter()
        conn.execute("CALL pgtraj.embed_table('bench.trips', 'geom', 'embedding', %s, batch_size => 1000)",
                     [BASE_MODEL])
        seconds = time.perf_counter() - t
        embedded = conn.execute("SELECT count(embedding) FROM bench.trips").fetchone()[0]
        out["embed_table"] = {"seconds": round(seconds, 1), "rows_embedded": embedded,
                              "rows_per_s": round(embedded / seconds, 1)}

        t = time.perf_counter()
        conn.execute("SELECT pgtraj.create_hnsw_index('bench.trips', 'embedding')")
        out["hnsw_build_seconds"] = round(time.perf_counter() - t, 1)

        # exact search in numpy over every embedding (a SET enable_indexscan would not reach the shards)
        ids, vecs = zip(*((i, np.array(json.loads(e), np.float32)) for i, e in
                          conn.execute("SELECT id, embedding::text FROM bench.trips WHERE embedding IS NOT NULL")))
        ids, vecs = np.array(ids), np.stack(vecs)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        row = {i: n for n, i in enumerate(ids)}
        exact, queries = {}, [q for q in queries if q in row]
        for q in queries:
            d = vecs @ vecs[row[q]]
            d[row[q]] = -np.inf  # similar(row_id) leaves the query row out
            exact[q] = ids[np.argsort(-d, kind="stable")[:10]].tolist()
        took, recall = [], []
        for q in queries:
            t = time.perf_counter()
            got = [int(r[0]) for r in conn.execute(
                "SELECT id FROM pgtraj.similar('bench.trips', 'embedding', row_id => %s, k => 10)", [q])]
            took.append((time.perf_counter() - t) * 1000)
            recall.append(len(set(got) & set(exact[q])) / max(len(exact[q]), 1))
        took.sort()
        out["similar"] = {"p50_ms": round(statistics.median(took), 2),
                          "p99_ms": round(took[int(0.99 * (len(took) - 1))], 2),
                          "recall@10": round(float(np.mean(recall)), 4)}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(default_data_dir() / "geolife"))
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows, _ = rows_of(Path(args.data), args.rows)
    queries = np.random.default_rng(0).choice(np.arange(1, len(rows) + 1), args.queries, replace=False).tolist()
    results: dict = {"rows": len(rows), "fixes": int(sum(len(r) for r in rows)), "settings": []}
    root = Path(tempfile.mkdtemp(prefix="pgtraj-bench-citus-"))
    root.chmod(0o755)  # the server user must reach the data directories under it
    try:
        for n in [0, *args.workers]:
            cluster = LocalCluster(root / f"n{n}", runtime_venv=root / "runtime-venv",
                                   settings={"fsync": "off", "synchronous_commit": "off"})
            try:
                cluster.start(workers=n or None, log=lambda m: None)
                results["settings"].append(measure(cluster, rows, n, queries))
            finally:
                cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    single = results["settings"][0]
    for s in results["settings"]:
        s["embed_table"]["ratio_to_single_node"] = round(s["embed_table"]["rows_per_s"]
                                                         / single["embed_table"]["rows_per_s"], 2)
        s["similar"]["p50_ratio_to_single_node"] = round(s["similar"]["p50_ms"] / single["similar"]["p50_ms"], 2)
    results["host_cores"] = __import__("os").cpu_count()
    results["wall_seconds"] = round(time.perf_counter() - t0)
    path = Path(__file__).parent / "results" / "citus.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
