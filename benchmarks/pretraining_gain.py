"""Pretraining gain by fine-tuning budget: next-cell fine-tuning from the hybrid-pretrained checkpoint of
benchmarks/next_location.py against the same model from random init, for several step budgets, on the same
test positions (H3-constrained decoding, as the best rows of next_location.json).

    .venv/bin/python benchmarks/next_location.py          # first: writes the pretrained checkpoint
    .venv/bin/python benchmarks/pretraining_gain.py [--budgets 100,300,1000]

Writes benchmarks/results/pretraining_gain.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from pgtraj.app.training import read_split
from pgtraj.core.tokenizer import Tokens
from pgtraj.db.connection import connect, resolve_dsn
from pgtraj.learn.evaluation import model_ranks, ranking_metrics
from pgtraj.learn.train import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn")
    ap.add_argument("--budgets", default="100,300,1000")
    ap.add_argument("--pretrained", default="pgtraj-output/bench/pretrain/checkpoint.pt")
    ap.add_argument("--out", default="pgtraj-output/bench/gain")
    args = ap.parse_args()
    pretrained = Path(args.pretrained)
    if not pretrained.exists():
        raise SystemExit(f"{pretrained} not found: run benchmarks/next_location.py first")
    pre_cfg = torch.load(pretrained, weights_only=False)["train_config"]
    base = {k: pre_cfg[k] for k in ("preset", "model", "tokenizer", "max_len", "batch_size")}
    base.update(objective="next_cell", lr=1e-3, warmup=50, eval_batches=4)
    with connect(resolve_dsn(args.dsn)) as conn:
        splits = {s: read_split(conn, "geolife.trajectories", s, id_column="traj_id", traj_column="geom",
                                split_column="split", log=lambda m: None) for s in ("train", "val", "test")}
    rows = {}
    for steps in (int(b) for b in args.budgets.split(",")):
        row = {}
        for init in ("pretrained", "random init"):
            cfg = {**base, "steps": steps, "eval_every": steps}
            if init == "pretrained":
                cfg["init_from"] = str(pretrained)
            out = Path(args.out) / f"{steps}-{init.replace(' ', '_')}"
            shutil.rmtree(out, ignore_errors=True)
            r = train(splits["train"], splits["val"], TrainConfig.from_dict(cfg), out, progress=False,
                      log=lambda m: None)
            tok = r.tokenizer
            test = [Tokens(*(getattr(x, f)[:base["max_len"] - 1] for f in Tokens.FIELDS))
                    for x in (tok.encode(p) for p in splits["test"])]
            row[init] = ranking_metrics(model_ranks(r.model, test, max_len=base["max_len"],
                                                    neighbours=tok.neighbour_table()))
        row["gain_acc@1_pct"] = round(100 * (row["pretrained"]["acc@1"] / row["random init"]["acc@1"] - 1), 1)
        row["gain_mrr_pct"] = round(100 * (row["pretrained"]["mrr"] / row["random init"]["mrr"] - 1), 1)
        rows[steps] = row
        print(f"{steps} steps: pretrained Acc@1 {row['pretrained']['acc@1']:.4f} MRR {row['pretrained']['mrr']:.4f};"
              f" random init Acc@1 {row['random init']['acc@1']:.4f} MRR {row['random init']['mrr']:.4f};"
              f" gain {row['gain_acc@1_pct']}% / {row['gain_mrr_pct']}%", flush=True)
    path = Path(__file__).parent / "results" / "pretraining_gain.json"
    path.write_text(json.dumps({"pretrained": str(pretrained), "config": base, "budgets": rows}, indent=2))


if __name__ == "__main__":
    main()
