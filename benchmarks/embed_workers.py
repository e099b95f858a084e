"""embed_table(workers => n) on one server against a single-process client round trip, on the same table.

    .venv/bin/pgtraj db start
    .venv/bin/python benchmarks/embed_workers.py [--rows 40000] [--workers 1 2 4]

The table bench.workers (id bigint key, geom LINESTRING M, embedding vector(128)) holds the first --rows of
benchmarks/scale.py's rows (every cleaned GeoLife piece, then sliding windows of 64 fixes), embedded with
the shipped base model, batches of 1,000, the column emptied (and vacuumed) before each run:
- client: one Python process reads id + WKB a batch at a time, embeds with the runtime's own code
  (runtime.tasks.encoder.embed_wkbs) and onnxruntime, and writes the batch back with one UPDATE; with one
  onnxruntime thread (as each backend has: pgtraj.threads = 1) and with one thread per core;
- CALL pgtraj.embed_table(..., workers => n): wall time from CALL to return, and, for n > 1, when each
  pg_cron session started (cron.job_run_details) and the rate over the time all n backends were at work
  (from the job row's progress, read every 0.25 s by a second connection). pg_cron 1.4 (Debian 12's)
  starts a job at the next minute, so the wall figure includes up to a minute of one backend alone.
Writes benchmarks/results/embed_workers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import onnxruntime as ort
import psycopg

from pgtraj.app import base_model
from pgtraj.core.contract import BASE_MODEL
from pgtraj.core.trajectory import to_wkb
from pgtraj.db.cluster import LocalCluster
from pgtraj.db.connection import resolve_dsn
from pgtraj.db.datasets import default_data_dir
from pgtraj.db.install import install
from pgtraj.learn.export import example_batch, export
from pgtraj.runtime.tasks.encoder import embed_wkbs

try:
    from benchmarks.scale import rows_of
except ImportError:  # run as a script from the repository root
    from scale import rows_of

BATCH = 1000


def empty(conn) -> None:
    conn.execute("UPDATE bench.workers SET embedding = NULL, embedding_model = NULL")
    conn.execute("VACUUM ANALYZE bench.workers")


def client_round_trip(conn, tok, max_len: int, sess) -> float:
    """Seconds for one process to read, embed and write back every row, batch by batch."""
    t, last = time.perf_counter(), 0
    while True:
        rows = conn.execute("SELECT id, ST_AsBinary(geom) FROM bench.workers WHERE id > %s ORDER BY id LIMIT %s",
                            [last, BATCH]).fetchall()
        if not rows:
            return time.perf_counter() - t
        embs, _ = embed_wkbs(tok, max_len, sess, [bytes(w) for _, w in rows], skip_errors=True)
        ok = [(k, e) for (k, _), e in zip(rows, embs) if e is not None]
        conn.execute("UPDATE bench.workers AS t SET embedding = u.e::vector FROM unnest(%s::bigint[], %s::text[])"
                     " AS u(k, e) WHERE t.id = u.k",
                     [[k for k, _ in ok], ["[" + ",".join(f"{v:.7g}" for v in e) + "]" for _, e in ok]])
        last = rows[-1][0]


def embed_table(url: str, workers: int, rows: int) -> dict:
    """One CALL, with the job's progress sampled from a second connection."""
    samples, stop = [], threading.Event()

    def watch():
        with psycopg.connect(url, autocommit=True) as w:
            while not stop.is_set():
                r = w.execute("SELECT id, done FROM pgtraj.jobs WHERE kind = 'embed_table' AND status = 'running'"
                              " ORDER BY id DESC LIMIT 1").fetchone()
                if r:
                    samples.append((time.perf_counter(), r[1]))
                stop.wait(0.25)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with psycopg.connect(url, autocommit=True) as conn:
        t = time.perf_counter()
        conn.execute("CALL pgtraj.embed_table('bench.workers', 'geom', 'embedding', %s, batch_size => %s,"
                     " workers => %s)", [BASE_MODEL, BATCH, workers])
        wall = time.perf_counter() - t
        stop.set()
        watcher.join()
        job, started, done = conn.execute("SELECT id, started_at, done FROM pgtraj.jobs ORDER BY id DESC LIMIT 1"
                                          ).fetchone()
        out = {"seconds": round(wall, 1), "rows_per_s": round(done / wall, 1)}
        if workers > 1:
            joined = [r[0] for r in conn.execute(
                "SELECT extract(epoch FROM min(d.start_time) - %s) FROM cron.job_run_details d"
                " WHERE d.command LIKE %s GROUP BY d.command ORDER BY 1", [started, f"CALL pgtraj._embed_part({job}, %"])]
            out["sessions_started_after_s"] = [round(float(s), 1) for s in joined]
            if len(joined) == workers - 1:
                # the rate from the last session's start (on the watcher's clock) to the end of the job
                t_all = t + float(joined[-1])
                before = [d for s, d in samples if s <= t_all]
                done_then = before[-1] if before else 0
                if t + wall - t_all > 1:
                    out["rows_per_s_all_backends"] = round((done - done_then) / (t + wall - t_all), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn")
    ap.add_argument("--data", default=str(default_data_dir() / "geolife"))
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    t0 = time.perf_counter()
    url = resolve_dsn(args.dsn, None)
    install(url, python_path=None if args.dsn else LocalCluster().python_path, log=lambda m: None)
    rows, _ = rows_of(Path(args.data), args.rows)
    results: dict = {"rows": len(rows), "fixes": int(sum(len(r) for r in rows)), "cores": os.cpu_count(),
                     "batch_size": BATCH}
    with psycopg.connect(url, autocommit=True) as conn:
        results["pg_cron"] = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'").fetchone()[0]
        base_model.add(conn, log=lambda m: None)
        conn.execute("CREATE SCHEMA IF NOT EXISTS bench")
        conn.execute("DROP TABLE IF EXISTS bench.workers")
        conn.execute("CREATE TABLE bench.workers (id bigint PRIMARY KEY, geom geometry(LineStringM, 4326),"
                     " embedding vector(128), embedding_model bigint)")
        with conn.cursor().copy("COPY bench.workers (id, geom) FROM STDIN") as copy:
            for i, r in enumerate(rows):
                copy.write_row((i + 1, to_wkb(r, srid=4326).hex()))
        conn.execute("ANALYZE bench.workers")

        model, tok, card = base_model.load()
        graph = export(model, "encoder", example_batch(tok, rows[:4], 128))
        for threads in (1, os.cpu_count()):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            sess = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
            empty(conn)
            s = client_round_trip(conn, tok, card["train"]["max_len"], sess)
            results[f"client_{threads}_thread"] = {"seconds": round(s, 1), "rows_per_s": round(len(rows) / s, 1)}
            print(f"client, {threads} thread(s)", results[f"client_{threads}_thread"], flush=True)
    base = results["client_1_thread"]["rows_per_s"]
    best = max(base, results[f"client_{os.cpu_count()}_thread"]["rows_per_s"])
    for n in args.workers:
        with psycopg.connect(url, autocommit=True) as conn:
            empty(conn)
        r = embed_table(url, n, len(rows))
        r["vs_client_1_thread"] = round(r["rows_per_s"] / base, 2)
        r["vs_best_client"] = round(r["rows_per_s"] / best, 2)
        if "rows_per_s_all_backends" in r:
            r["all_backends_vs_client_1_thread"] = round(r["rows_per_s_all_backends"] / base, 2)
        results[f"embed_table_workers_{n}"] = r
        print(f"embed_table workers => {n}", r, flush=True)
    results["wall_seconds"] = round(time.perf_counter() - t0)
    path = Path(__file__).parent / "results" / "embed_workers.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
