"""Next-location prediction on GeoLife, chronological splits: the model against classical baselines.

    .venv/bin/python benchmarks/next_location.py [--dsn URL] [--preset small] [--pretrain-steps N] [--steps M]

Methods, all evaluated on the same test positions (every next token of each test sequence, first
``max_len`` tokens), in one run:
  popularity, markov-1, markov-2   interpolated smoothing, weights tuned on the validation split
  model (random init)               next_cell objective, M steps
  model (pretrained + fine-tuned)   hybrid pretraining N steps (masked spans + contrastive), then next_cell M steps
Writes benchmarks/results/next_location.json (and the runs' curves under pgtraj-output/bench/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from pgtraj.app.training import read_split
from pgtraj.core.tokenizer import Tokens
from pgtraj.db.connection import connect, resolve_dsn
from pgtraj.learn.evaluation import (
    MarkovChain,
    model_ranks,
    ranking_metrics,
    tune_markov,
)
from pgtraj.learn.train import TrainConfig, train


def head(x: Tokens, n: int) -> Tokens:
    return Tokens(*(getattr(x, f)[:n] for f in Tokens.FIELDS))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn")
    ap.add_argument("--table", default="geolife.trajectories")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--pretrain-steps", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="pgtraj-output/bench")
    args = ap.parse_args()
    out = Path(args.out)
    for run in ("pretrain", "finetune", "scratch"):  # a benchmark starts from nothing (train() would resume)
        shutil.rmtree(out / run, ignore_errors=True)
    quiet = lambda m: None  # noqa: E731
    with connect(resolve_dsn(args.dsn)) as conn:
        splits = {s: read_split(conn, args.table, s, id_column="traj_id", traj_column="geom", split_column="split", log=quiet)
                  for s in ("train", "val", "test")}
    base = dict(preset=args.preset, max_len=args.max_len, batch_size=32, lr=1e-3, warmup=50, eval_every=200,
                eval_batches=4, device=args.device, tokenizer={"resolution": 9, "min_count": 5})
    t0 = time.perf_counter()
    pre = train(splits["train"], splits["val"],
                TrainConfig.from_dict({**base, "objective": "hybrid", "steps": args.pretrain_steps}),
                out / "pretrain", progress=False, log=print)
    t_pre = time.perf_counter() - t0
    tok = pre.tokenizer
    finetuned = train(splits["train"], splits["val"], TrainConfig.from_dict(
        {**base, "objective": "next_cell", "steps": args.steps, "init_from": str(out / "pretrain" / "checkpoint.pt")}),
        out / "finetune", progress=False, log=print)
    t0 = time.perf_counter()
    # same vocabulary as the pretrained model (fit on the same train split with the same config)
    scratch = train(splits["train"], splits["val"], TrainConfig.from_dict(
        {**base, "objective": "next_cell", "steps": args.steps}), out / "scratch", progress=False, log=print)
    t_scratch = time.perf_counter() - t0
    assert np.array_equal(scratch.tokenizer.vocab, tok.vocab)

    enc = {s: [head(tok.encode(p), args.max_len - 1) for p in pieces] for s, pieces in splits.items()}
    seqs = {s: [x.tokens for x in v] for s, v in enc.items()}
    results = {"popularity": ranking_metrics(MarkovChain(0, tok.vocab_size).fit(seqs["train"]).ranks(seqs["test"]))}
    for order in (1, 2):
        mc = tune_markov(order, tok.vocab_size, seqs["train"], seqs["val"])
        results[f"markov-{order}"] = {**ranking_metrics(mc.ranks(seqs["test"])), "lambdas": mc.lambdas}
    results["model (random init)"] = ranking_metrics(model_ranks(scratch.model, enc["test"], max_len=args.max_len))
    results["model (pretrained + fine-tuned)"] = ranking_metrics(model_ranks(finetuned.model, enc["test"], max_len=args.max_len))
    nb = tok.neighbour_table()
    results["model (random init), H3-constrained"] = ranking_metrics(
        model_ranks(scratch.model, enc["test"], max_len=args.max_len, neighbours=nb))
    results["model (pretrained + fine-tuned), H3-constrained"] = ranking_metrics(
        model_ranks(finetuned.model, enc["test"], max_len=args.max_len, neighbours=nb))
    best_markov = max(("markov-1", "markov-2"), key=lambda k: results[k]["mrr"])
    pre_r, rnd_r = results["model (pretrained + fine-tuned)"], results["model (random init)"]
    best_model = {k: max(r[k] for name, r in results.items() if name.startswith("model")) for k in ("acc@1", "mrr")}
    summary = {
        "data": {s: len(v) for s, v in splits.items()},
        "vocab_size": tok.vocab_size, "test_positions": pre_r["n"],
        "config": {"preset": args.preset, "pretrain_steps": args.pretrain_steps, "steps": args.steps,
                   "max_len": args.max_len, "model": finetuned.model_config.to_dict(), "base": base},
        "device": finetuned.device, "seconds": {"pretrain": round(t_pre, 1), "scratch": round(t_scratch, 1)},
        "training_tokens_per_second": {"pretrain": pre.metrics["tokens_per_second"],
                                       "next_cell": scratch.metrics["tokens_per_second"]},
        "results": results,
        "pretraining_gain_acc@1_pct": round(100 * (pre_r["acc@1"] / rnd_r["acc@1"] - 1), 1) if rnd_r["acc@1"] else None,
        "pretraining_gain_mrr_pct": round(100 * (pre_r["mrr"] / rnd_r["mrr"] - 1), 1),
        "best_markov": best_markov,
        "model_beats_best_markov": {k: best_model[k] > results[best_markov][k] for k in ("acc@1", "mrr")},
    }
    path = Path(__file__).parent / "results" / "next_location.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nGeoLife next location, test split ({pre_r['n']} predictions, vocabulary {tok.vocab_size}):\n")
    print("| method | Acc@1 | Acc@5 | Acc@10 | MRR |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['acc@1']:.4f} | {r['acc@5']:.4f} | {r['acc@10']:.4f} | {r['mrr']:.4f} |")
    print(f"\npretraining gain: Acc@1 {summary['pretraining_gain_acc@1_pct']}%, MRR {summary['pretraining_gain_mrr_pct']}%;"
          f" beats {best_markov}: {summary['model_beats_best_markov']}")


if __name__ == "__main__":
    main()
