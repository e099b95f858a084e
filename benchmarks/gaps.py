"""Gap filling on people the model never saw: hidden runs of 3-20 cells, in metres, against linear interpolation.

    .venv/bin/python benchmarks/gaps.py [--base DIR] [--trajs 400] [--tune]

GeoLife users 120-139 (never read by any training), a fixed sample of --trajs cleaned pieces; in each, up to
three gaps of 3-20 consecutive cells between two seen cells, on contiguous stretches (learn.evaluation.
gap_recovery). Methods on the same gaps: the base model's expected place at each position over the
contiguous grid paths between the gap's ends (core.gaps.expected_positions, what pgtraj.fill_gaps serves),
the single likeliest such path (core.gaps.best_path), both weighing paths with a pull towards the straight
line of core.gaps.SIGMA_M metres (or with --tune the best of a grid for the served method's median on the
validation split of the base model's own users 10-119), its per-position argmax over all cells, and linear
interpolation in time between the seen cells (which uses the true time of every hidden cell). Errors in
metres to the true cell's centre and to the mean of the true fixes in it. Writes
benchmarks/results/gaps.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pgtraj.app.base_model import ASSET_DIR, load
from pgtraj.core.clean import CleaningConfig, clean
from pgtraj.core.gaps import SIGMA_M
from pgtraj.core.splits import GEOLIFE_PRETRAIN_USERS, GEOLIFE_UNSEEN_USERS
from pgtraj.db.datasets import default_data_dir, read_geolife_files
from pgtraj.learn.evaluation import gap_recovery

MAX_LEN = 128


def pieces(users, split: str, n: int) -> list:
    """A fixed sample of ``n`` cleaned pieces of these GeoLife users' ``split``."""
    g = read_geolife_files(default_data_dir() / "geolife", list(users))
    out = [p for traj, s in zip(g.trajectories, g.split.tolist()) if s == split for p in clean(traj, CleaningConfig())]
    rng = np.random.default_rng(0)
    return [out[i] for i in sorted(rng.choice(len(out), min(n, len(out)), replace=False))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=str(ASSET_DIR), help="a base model release folder")
    ap.add_argument("--trajs", type=int, default=400)
    ap.add_argument("--tune", action="store_true", help="choose sigma on users 10-119's validation split")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, tok, card = load(Path(args.base))
    sigma, tuning = SIGMA_M, None
    if args.tune:
        val = [tok.encode(p) for p in pieces(GEOLIFE_PRETRAIN_USERS, "val", args.trajs)]
        tuning = {str(s): gap_recovery(model, tok, val, max_len=MAX_LEN, sigma_m=s or None)["expected"]["median_m"]
                  for s in (0, 50, 100, 200, 400)}
        sigma = float(min(tuning, key=tuning.get))
        print(f"median metres by sigma on validation: {tuning}; chosen {sigma}")
    chosen = pieces(GEOLIFE_UNSEEN_USERS, "unseen", args.trajs)
    result = gap_recovery(model, tok, [tok.encode(p) for p in chosen], max_len=MAX_LEN, sigma_m=sigma or None)
    result.update(base=card["name"], base_built=card["built"], pieces=len(chosen), sigma_m=sigma,
                  validation_median_m_by_sigma=tuning, seconds=round(time.perf_counter() - t0))
    (Path(__file__).parent / "results" / "gaps.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
