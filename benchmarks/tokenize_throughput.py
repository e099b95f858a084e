"""Throughput of read + clean + tokenize against the raw cost of reading the same rows with psycopg.

    .venv/bin/python benchmarks/tokenize_throughput.py [--dsn URL] [--users 0-9]

Loads the GeoLife users asked for (if geolife.trajectories is not there yet), then, in one run and on the
same rows, times:
  raw       psycopg server-side cursor fetching (traj_id, ST_AsBinary(geom)), nothing else: the floor
  read      pgtraj TrajectoryReader (SQL checks, WKB -> validated numpy arrays)
  clean     pgtraj.clean on what was read
  tokenize  Tokenizer.encode (H3 res 9, interpolation on) on the cleaned pieces
Writes benchmarks/results/tokenize_throughput.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import psycopg

from pgtraj.core.clean import clean
from pgtraj.core.tokenizer import Tokenizer, TokenizerConfig
from pgtraj.db.connection import connect, resolve_dsn
from pgtraj.db.datasets import default_data_dir, load_geolife, parse_ids
from pgtraj.db.readers import QuerySource, TrajectoryReader

QUERY = "SELECT traj_id, geom FROM geolife.trajectories ORDER BY traj_id"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn")
    ap.add_argument("--users", default="0-9")
    ap.add_argument("--repeat", type=int, default=3, help="best of N for each stage")
    args = ap.parse_args()
    with connect(resolve_dsn(args.dsn)) as conn:
        if not conn.execute("SELECT to_regclass('geolife.trajectories') IS NOT NULL").fetchone()[0]:
            load_geolife(conn, default_data_dir() / "geolife", users=parse_ids(args.users), progress=False)
            conn.commit()
        n_traj, n_points = conn.execute("SELECT count(*), sum(n_points) FROM geolife.trajectories").fetchone()
        server = conn.execute("SHOW server_version").fetchone()[0]
        timings = {k: [] for k in ("raw", "read", "clean", "tokenize")}
        trajs = pieces = None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            with conn.transaction(), conn.cursor(name="raw", binary=True) as cur:
                cur.itersize = 500
                cur.execute("SELECT traj_id, ST_AsBinary(geom) FROM geolife.trajectories ORDER BY traj_id")
                raw_bytes = sum(len(wkb) for _, wkb in cur)
            timings["raw"].append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            trajs = list(TrajectoryReader(conn, QuerySource(QUERY)))
            timings["read"].append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            pieces = [p for tr in trajs for p in clean(tr)]
            timings["clean"].append(time.perf_counter() - t0)

            tok = Tokenizer.fit(pieces, TokenizerConfig(resolution=9, min_count=5))
            t0 = time.perf_counter()
            n_tokens = sum(len(tok.encode(p)) for p in pieces)
            timings["tokenize"].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in timings.items()}
    pipeline = best["read"] + best["clean"] + best["tokenize"]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "postgres": server, "psycopg": psycopg.__version__,
        "trajectories": n_traj, "points": int(n_points), "tokens": n_tokens, "raw_wkb_bytes": raw_bytes,
        "seconds_best_of": args.repeat, "seconds": best,
        "points_per_second": {k: int(n_points / v) for k, v in best.items()},
        "pipeline_points_per_second": int(n_points / pipeline),
        "pipeline_vs_raw_read": round(pipeline / best["raw"], 2),
        "read_vs_raw_read": round(best["read"] / best["raw"], 2),
    }
    out = Path(__file__).parent / "results" / "tokenize_throughput.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"GeoLife: {n_traj} trajectories, {n_points} points -> {n_tokens} tokens (best of {args.repeat})\n")
    print("| stage | seconds | points/s |\n|---|---|---|")
    for k, v in best.items():
        print(f"| {k} | {v:.2f} | {int(n_points / v):,} |")
    print(f"| read+clean+tokenize | {pipeline:.2f} | {int(n_points / pipeline):,} |")
    print(f"\nread+clean+tokenize takes {result['pipeline_vs_raw_read']}x the raw psycopg read "
          f"(read alone: {result['read_vs_raw_read']}x)")


if __name__ == "__main__":
    main()
