"""Route twin search on people the model never saw, with every query shifted in time.

    .venv/bin/python benchmarks/route_search.py [--queries 200] [--distractors 5000] [--exact-queries 20]

t2vec/TrajCL protocol on GeoLife users 120-139 (never read by any training): windows of 40-200 fixes of
their cleaned pieces; a query is a window's odd fixes, its twin the even fixes, hidden among the even fixes
of --distractors other windows. Each query is moved in time by a random 1-30 days (and a random time of
day), so that a method can only find its twin by where it goes: comparing timestamps finds nothing. Mean
rank of the twin (ideal 1.0), HR@1, HR@5. Methods on the same cases: the shipped base model's route
embedding (its ONNX encoder through onnxruntime, as in the database), exact DTW, discrete Fréchet and EDR
(on the first --exact-queries queries: they cost seconds per query against thousands of candidates), and a
start/end-point baseline (metres between the first fixes plus between the last).

The spacetime aspect (pgtraj.embed(..., 'spacetime'): the route and when) is judged on the same windows
twice: with the shift, where it should not find the twin (the twin happened on another day), and without
it (same place, same time), next to the route embedding and a start/end-timestamp baseline (seconds between
the first fixes plus between the last). Writes benchmarks/results/route_search.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pgtraj.app.base_model import ASSET_DIR, load
from pgtraj.core.aspects import spacetime
from pgtraj.core.clean import CleaningConfig, clean
from pgtraj.core.splits import UNSEEN
from pgtraj.core.trajectory import Trajectory, haversine_m
from pgtraj.db.datasets import default_data_dir, read_geolife_files
from pgtraj.learn.evaluation import (
    distance_matrix,
    dtw,
    edr,
    frechet,
    search_metrics,
    split_odd_even,
    twin_ranks,
)
from pgtraj.learn.export import onnx_embedder

DAY = 86_400.0


def windows(pieces: list, lo: int, hi: int) -> list:
    """Non-overlapping windows of ``hi`` fixes (the remainder too, when it has at least ``lo``)."""
    out = []
    for p in pieces:
        for a in range(0, len(p), hi):
            if len(p) - a >= lo:
                out.append(p.take(slice(a, a + hi)))
    return out


def shifted(tr: Trajectory, rng) -> Trajectory:
    return Trajectory(tr.id, tr.t + rng.integers(1, 31) * DAY + rng.uniform(0, DAY), tr.lat, tr.lon, tr.part)


def start_end_times(a: Trajectory, b: Trajectory) -> float:
    return float(abs(a.t[0] - b.t[0]) + abs(a.t[-1] - b.t[-1]))


def start_end(a: Trajectory, b: Trajectory) -> float:
    return float(haversine_m(a.lat[[0, -1]], a.lon[[0, -1]], b.lat[[0, -1]], b.lon[[0, -1]]).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(default_data_dir() / "geolife"))
    ap.add_argument("--base", default=str(ASSET_DIR))
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--distractors", type=int, default=5000)
    ap.add_argument("--exact-queries", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default="benchmarks/results/route_search.json")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    g = read_geolife_files(Path(args.data))
    pieces = [p for tr, s in zip(g.trajectories, g.split) if s == UNSEEN for p in clean(tr, CleaningConfig())]
    pool = windows(pieces, 40, 200)
    rng.shuffle(pool)
    n_db = min(args.queries + args.distractors, len(pool))
    pool = pool[:n_db]
    pairs = [split_odd_even(t) for t in pool]
    same_time = [q for q, _ in pairs[:args.queries]]
    queries = [shifted(q, rng) for q in same_time]
    database = [d for _, d in pairs]  # the queries' twins first, then the distractors
    print(f"{len(pieces)} unseen pieces -> {len(pool)} windows; {len(queries)} queries, {len(database)} candidates"
          f" ({time.perf_counter() - t0:.0f} s)", flush=True)

    model, tok, card = load(Path(args.base))
    embed = onnx_embedder(model, tok, queries[:1])

    def embed_spacetime(trajs: list) -> np.ndarray:  # what pgtraj.embed(..., 'spacetime') computes
        return spacetime(embed(trajs), [t.t[0] for t in trajs], [t.t[-1] for t in trajs])

    def run(name, q, fn):
        t1 = time.perf_counter()
        ranks = twin_ranks(fn(q))
        r = {**search_metrics(ranks), "seconds": round(time.perf_counter() - t1, 1)}
        print(f"| {name} | {r['mean_rank']:.3f} | {r['hr@1']:.3f} | {r['hr@5']:.3f} | {r['queries']} | {r['seconds']} |",
              flush=True)
        return r

    print("| method | mean rank | HR@1 | HR@5 | queries | seconds |\n|---|---|---|---|---|---|")
    ed = embed(database)
    results = {
        "pgtraj-base route embedding": run("pgtraj-base route embedding", queries, lambda q: 1.0 - embed(q) @ ed.T),
        "start/end points": run("start/end points", queries, lambda q: distance_matrix(q, database, start_end)),
    }
    exact = queries[:args.exact_queries]
    results[f"pgtraj-base, first {len(exact)} queries"] = run(f"pgtraj-base, first {len(exact)} queries", exact,
                                                              lambda q: 1.0 - embed(q) @ ed.T)
    for name, fn in (("DTW", dtw), ("discrete Fréchet", frechet), ("EDR (100 m)", edr)):
        results[name] = run(name, exact, lambda q, fn=fn: distance_matrix(q, database, fn))
    sd = embed_spacetime(database)
    results["pgtraj-base spacetime embedding"] = run("pgtraj-base spacetime embedding", queries,
                                                     lambda q: 1.0 - embed_spacetime(q) @ sd.T)
    print("without the time shift (same place, same time):")
    same = {"pgtraj-base spacetime embedding": run("pgtraj-base spacetime embedding", same_time,
                                                   lambda q: 1.0 - embed_spacetime(q) @ sd.T),
            "pgtraj-base route embedding": run("pgtraj-base route embedding", same_time, lambda q: 1.0 - embed(q) @ ed.T),
            "start/end timestamps": run("start/end timestamps", same_time,
                                        lambda q: distance_matrix(q, database, start_end_times))}
    summary = {"protocol": __doc__.split("\n\n")[1], "users": "120-139 (unseen)", "queries": len(queries),
               "candidates": len(database), "time_shift_days": [1, 30], "fixes_per_window": [40, 200],
               "base": {k: card[k] for k in ("steps", "tokens_seen", "parameters")}, "results": results,
               "results without the time shift": same,
               "seconds": round(time.perf_counter() - t0)}
    Path(args.results).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.results} ({summary['seconds']} s)")


if __name__ == "__main__":
    main()
