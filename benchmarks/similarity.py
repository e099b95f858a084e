"""Similarity search, t2vec/TrajCL protocol, on GeoLife test pieces: the model's embeddings (through its ONNX
encoder and onnxruntime, as in the database) against exact DTW, discrete Fréchet and EDR.

    .venv/bin/python benchmarks/similarity.py --checkpoint pgtraj-output/bench/pretrain/checkpoint.pt

Query = a piece's odd fixes, twin = its even fixes, hidden among the even halves of other test pieces. Mean
rank of the twin (ideal 1.0), HR@1, HR@5, and seconds for the whole distance matrix; for the embeddings also
under downsampling (a share of fixes dropped from queries and database) and distortion (Gaussian noise on a
share of fixes). Writes results/similarity.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pgtraj.app.training import read_split
from pgtraj.core.trajectory import Trajectory
from pgtraj.db.connection import connect, resolve_dsn
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
from pgtraj.learn.train import load_checkpoint

_M_PER_DEG = 111_195.0


def downsample(tr: Trajectory, rate: float, rng) -> Trajectory:
    keep = rng.random(len(tr)) >= rate
    keep[[0, -1]] = True
    return tr.take(keep)


def distort(tr: Trajectory, rate: float, rng, sigma_m: float = 30.0) -> Trajectory:
    hit = rng.random(len(tr)) < rate
    lat = tr.lat + hit * rng.normal(0, sigma_m, len(tr)) / _M_PER_DEG
    lon = tr.lon + hit * rng.normal(0, sigma_m, len(tr)) / (_M_PER_DEG * np.cos(np.radians(tr.lat)))
    return Trajectory(tr.id, tr.t, lat, lon, tr.part)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn")
    ap.add_argument("--checkpoint", required=True, help="checkpoint.pt of a training run (hybrid or contrastive)")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--database", type=int, default=400)
    ap.add_argument("--min-points", type=int, default=40)
    ap.add_argument("--max-points", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--splits", default="test", help="where queries and database come from, e.g. val,test")
    ap.add_argument("--exact-queries", type=int, help="run the exact measures on the first N queries only"
                    " (the embedding is reported on those and on all)")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    model, tok, ckpt = load_checkpoint(args.checkpoint)
    with connect(resolve_dsn(args.dsn)) as conn:
        pieces = [p for split in args.splits.split(",") for p in read_split(
            conn, "geolife.trajectories", split, id_column="traj_id", traj_column="geom", split_column="split",
            log=lambda m: None)]
    pool = [t for t in pieces if args.min_points <= len(t) <= args.max_points]
    rng.shuffle(pool)
    n_db = min(args.database, len(pool))
    pool = pool[:n_db]
    n_q = min(args.queries, n_db)
    pairs = [split_odd_even(t) for t in pool]
    queries = [q for q, _ in pairs[:n_q]]
    database = [d for _, d in pairs]  # twins of the queries first, then the others' even halves

    embed = onnx_embedder(model, tok, queries[:1])

    def embedding_run(q, d):
        t0 = time.perf_counter()
        eq, ed = embed(q), embed(d)
        dist = 1.0 - eq @ ed.T  # cosine distance (embeddings are L2-normalised)
        return {**search_metrics(twin_ranks(dist)), "seconds": round(time.perf_counter() - t0, 3)}

    n_exact = min(args.exact_queries or n_q, n_q)
    exact_q = queries[:n_exact]
    results = {"embedding (model, ONNX)": embedding_run(exact_q, database)}
    for name, fn in (("DTW", dtw), ("discrete Fréchet", frechet), ("EDR (100 m)", edr)):
        t0 = time.perf_counter()
        ranks = twin_ranks(distance_matrix(exact_q, database, fn))
        results[name] = {**search_metrics(ranks), "seconds": round(time.perf_counter() - t0, 3)}
    robustness = {}
    for rate in (0.1, 0.3, 0.5):
        robustness[f"downsample {rate}"] = embedding_run([downsample(t, rate, rng) for t in queries],
                                                         [downsample(t, rate, rng) for t in database])
        robustness[f"distort {rate}"] = embedding_run([distort(t, rate, rng) for t in queries],
                                                      [distort(t, rate, rng) for t in database])
    summary = {"checkpoint": {"objective": ckpt["train_config"]["objective"], "preset": ckpt["train_config"]["preset"],
                              "steps": ckpt["step"]},
               "splits": args.splits, "queries": n_q, "exact_queries": n_exact, "database": n_db,
               "points_per_piece": [args.min_points, args.max_points],
               "results": results, "embedding_all_queries": embedding_run(queries, database),
               "embedding_robustness": robustness}
    out = Path(__file__).parent / "results" / "similarity.json"
    out.write_text(json.dumps(summary, indent=2))
    print(f"{n_exact} queries (exact measures), {n_q} (embedding, all), database of {n_db}:\n\n"
          "| method | mean rank | HR@1 | HR@5 | seconds |\n|---|---|---|---|---|")
    rows = {**results, f"embedding, all {n_q} queries": summary["embedding_all_queries"],
            **{f"embedding, {k}": v for k, v in robustness.items()}}
    for name, r in rows.items():
        print(f"| {name} | {r['mean_rank']:.2f} | {r['hr@1']:.2f} | {r['hr@5']:.2f} | {r['seconds']} |")


if __name__ == "__main__":
    main()
