"""Masked-span recovery in metres and next-cell perplexity on the GeoLife test split, from the checkpoints
that benchmarks/next_location.py wrote (no training here).

    .venv/bin/python benchmarks/recovery.py --runs pgtraj-output/bench

Gap recovery (learn.evaluation.gap_recovery) uses the hybrid-pretrained model (its masked-span head) against linear interpolation in time
between the known cells around each span; perplexity compares the fine-tuned and the randomly initialised
next-cell models. Writes results/recovery.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pgtraj.app.training import read_split
from pgtraj.core.tokenizer import Tokens
from pgtraj.db.connection import connect, resolve_dsn
from pgtraj.learn.evaluation import gap_recovery, perplexity
from pgtraj.learn.train import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn")
    ap.add_argument("--runs", default="pgtraj-output/bench")
    ap.add_argument("--max-len", type=int, default=128)
    args = ap.parse_args()
    runs = Path(args.runs)
    with connect(resolve_dsn(args.dsn)) as conn:
        test = read_split(conn, "geolife.trajectories", "test", id_column="traj_id", traj_column="geom",
                          split_column="split", log=lambda m: None)
    pre, tok, ckpt = load_checkpoint(runs / "pretrain" / "checkpoint.pt")
    enc = [Tokens(*(getattr(x, f)[: args.max_len - 1] for f in Tokens.FIELDS)) for x in map(tok.encode, test)]
    summary = {"test_pieces": len(enc), "pretrain": {"objective": ckpt["train_config"]["objective"],
                                                    "preset": ckpt["train_config"]["preset"], "steps": ckpt["step"]},
               "gap_recovery": gap_recovery(pre, tok, enc, max_len=args.max_len),
               "perplexity": {name: perplexity(load_checkpoint(runs / name / "checkpoint.pt")[0], enc, max_len=args.max_len)
                              for name in ("finetune", "scratch")},
               "vocab_size": tok.vocab_size}
    (Path(__file__).parent / "results" / "recovery.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
