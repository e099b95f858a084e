"""Next step on people the model never saw, in the user's terms, against the strongest simple baselines.

    .venv/bin/python benchmarks/unseen.py [--finetune-steps 300] [--fractions 0.01,0.1,1] [--eval-trajs 800]

GeoLife protocol (pgtraj.core.splits): users 120-139 are never read by any training; the shipped base model
(pgtraj/assets/base) was pretrained on users 10-119; users 0-9 stand for a user's own data. A case is a
prefix of a trip that ends at an observed fix (never an interpolated cell), and the truth is the next
resolution-9 cell; a method that cannot name that cell (a coarse fallback token, UNK) is wrong.

Two settings, each evaluated on the same unseen-user cases (a fixed sample of --eval-trajs trips) and on the
seen users' chronological test split:
  A. the base model as shipped (zero-shot) vs baselines fit on the base model's training data (10-119);
  B. a user's own data (0-9): fine-tuned from the base model vs the same model trained from scratch with the
     same budget, on all of it or on a share (--fractions: the few-shot curve), and baselines fit on 0-9.
Baselines: straight on (the grid neighbour continuing the last move, then by angle), Markov-1/2 over true
cells (interpolated, weights tuned on validation) alone and backed off to straight on, and a move Markov
chain (order 3, place-free). Writes benchmarks/results/unseen.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from pgtraj.app.base_model import ASSET_DIR, load
from pgtraj.core.clean import CleaningConfig, clean
from pgtraj.core.splits import GEOLIFE_FINETUNE_USERS, GEOLIFE_PRETRAIN_USERS, UNSEEN
from pgtraj.core.tokenizer import SPECIAL_TOKENS
from pgtraj.db.datasets import default_data_dir, read_geolife_files
from pgtraj.learn import evaluation as ev
from pgtraj.learn.pretrained import Pretrained
from pgtraj.learn.train import TrainConfig, train

MAX_LEN = 128


def pieces_by_group(data_dir: Path) -> dict[str, list]:
    """Cleaned pieces: base_train/base_val/base_test (10-119), own_train/own_val/own_test (0-9), unseen."""
    g = read_geolife_files(data_dir)
    out: dict[str, list] = {}
    pre, own = set(GEOLIFE_PRETRAIN_USERS), set(GEOLIFE_FINETUNE_USERS)
    for traj, user, split in zip(g.trajectories, g.user.tolist(), g.split.tolist()):
        group = UNSEEN if split == UNSEEN else f"{'base' if user in pre else 'own' if user in own else '?'}_{split}"
        out.setdefault(group, []).extend(clean(traj, CleaningConfig()))
    return out


def sample(pieces: list, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [pieces[i] for i in sorted(rng.choice(len(pieces), min(n, len(pieces)), replace=False))]


def base_init(model, tok, card: dict) -> Pretrained:
    """The shipped base model (base_model.load) as what fine-tuning starts from."""
    return Pretrained(dict(model.state_dict()), tok, card["model"], "pgtraj-base", card["objective"], card["steps"])


def fine_tune_config(objective: str, steps: int, card: dict, *, from_base: bool) -> dict:
    """A user's fine-tuning run: from pgtraj-base, or from scratch in the same shape with the same budget.
    The tokenizer is the one a user's own run would fit (the base vocabulary is inherited when it knows
    most cells)."""
    cfg = {"objective": objective, "steps": steps, "batch_size": 32, "max_len": MAX_LEN, "warmup": 30,
           "eval_every": max(steps // 2, 1), "eval_batches": 4,
           "tokenizer": {**card["train"]["tokenizer"], "min_count": 5}, "min_trajectories": 4}
    cfg.update({"lr": 5e-4, "init_from": "pgtraj-base"} if from_base else {"lr": 1e-3, "preset": "small"})
    return cfg


def judge(cases: ev.StepCases, scores: np.ndarray) -> dict:
    return ev.step_metrics(cases.frame_ranks(scores), ev.top1_error_m(cases, ev.frame_top1(cases, scores)))


def baselines(tok, fit_on: list, tune_on: list, evals: dict[str, list]) -> dict:
    """Every baseline, fit on ``fit_on`` (tuned on ``tune_on``), on each evaluation set."""
    enc_fit = [tok.encode(p) for p in fit_on]
    enc_tune = [tok.encode(p) for p in tune_on[:300]]
    chains = {f"markov-{k}" + ("+straight-on" if bo else ""): ev.tune_cell_markov(k, enc_fit, enc_tune, MAX_LEN, backoff=bo)
              for k in (1, 2) for bo in (False, True)}
    moves = ev.MoveMarkov(3).fit(enc_fit)
    out = {}
    for name, pieces in evals.items():
        enc = [tok.encode(p) for p in pieces]
        cases = ev.StepCases.of(enc, MAX_LEN)
        r = {"straight-on": judge(cases, ev.straight_on_scores(cases)),
             "move-markov-3": judge(cases, moves.scores(cases, enc))}
        for label, mc in chains.items():
            ranks, top = mc.ranks(cases, enc)
            r[label] = {**ev.step_metrics(ranks, ev.top1_error_m(cases, top)), "lambdas": list(mc.lambdas)}
        out[name] = r
    return out


def model_results(model, tok, evals: dict[str, list], how: str = "move") -> dict:
    """The model's next-step figures; ``how``: which head ranks the neighbours (ev.model_step_scores)."""
    out = {}
    for name, pieces in evals.items():
        enc = [tok.encode(p) for p in pieces]
        cases = ev.StepCases.of(enc, MAX_LEN)
        out[name] = judge(cases, ev.model_step_scores(model, tok, cases, enc, how=how, max_len=MAX_LEN))
        known = np.concatenate([x.tokens >= len(SPECIAL_TOKENS) for x in enc]).mean()
        out[name]["cells_with_a_token"] = float(known)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(default_data_dir() / "geolife"))
    ap.add_argument("--base", default=str(ASSET_DIR), help="a base model release (pgtraj base build)")
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--fractions", default="1", help="shares of users 0-9's training pieces to fine-tune on,"
                                                     " e.g. 0.01,0.1,1 (the few-shot curve)")
    ap.add_argument("--eval-trajs", type=int, default=800)
    ap.add_argument("--heads", default="", help="also rank A's cases with these heads of the base model: vocab"
                    " (next token, constrained to the grid neighbours), mix (move + token logits)")
    ap.add_argument("--settings", default="A,B", help="A (the base model zero-shot), B (fine-tuning), or both")
    ap.add_argument("--out", default="pgtraj-output/bench/unseen")
    ap.add_argument("--results", default="benchmarks/results/unseen.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    P = pieces_by_group(Path(args.data))
    print({k: len(v) for k, v in sorted(P.items())}, f"{time.perf_counter() - t0:.0f} s", flush=True)
    unseen = sample(P[UNSEEN], args.eval_trajs)
    model, tok, card = load(Path(args.base))
    results: dict = {"protocol": __doc__.split("\n\n")[2], "base": {k: card[k] for k in ("steps", "tokens_seen",
                                                                                         "parameters", "data")},
                     "eval_trajectories": len(unseen)}

    # A: the base model as shipped
    evals = {"unseen users 120-139": unseen, "seen users 10-119 (test split)": sample(P["base_test"], args.eval_trajs)}
    a = baselines(tok, P["base_train"], P["base_val"], evals)
    for name, r in model_results(model, tok, evals).items():
        a[name]["pgtraj-base (zero-shot)"] = r
    for how in args.heads.split(",") if args.heads else ():  # the same model ranked by its other heads
        for name, r in model_results(model, tok, evals, how=how).items():
            a[name][f"pgtraj-base, {how} head"] = r
    results["A: base model vs baselines fit on users 10-119"] = a
    print_table("A", a)

    if "B" not in args.settings.split(","):
        return finish(results, args, t0)
    # B: a user's own data, fine-tuned from the base model or from scratch with the same budget
    evals = {"unseen users 120-139": unseen, "own users 0-9 (test split)": sample(P["own_test"], args.eval_trajs)}
    b = baselines(tok, P["own_train"], P["own_val"], evals)
    init = base_init(model, tok, card)
    for fraction in (float(f) for f in args.fractions.split(",")):
        # a user with less data: a random share of the training pieces (validation stays whole)
        train_set = sample(P["own_train"], max(8, round(fraction * len(P["own_train"]))), seed=1)
        share = f", {fraction:.0%} of the data ({len(train_set)} pieces)" if fraction < 1 else ""
        for label, pre in ((f"fine-tuned from pgtraj-base{share}", init), (f"from scratch, same budget{share}", None)):
            cfg = fine_tune_config("next_cell", args.finetune_steps, card, from_base=pre is not None)
            run = Path(args.out) / f"{label.split()[0]}-{fraction}"
            shutil.rmtree(run, ignore_errors=True)  # a benchmark starts from nothing (train() would resume)
            res = train(train_set, P["own_val"], TrainConfig.from_dict(cfg), run, progress=False,
                        log=lambda m: None, init=pre)
            for name, r in model_results(res.model, res.tokenizer, evals).items():
                b[name][label] = {**r, "steps": args.finetune_steps, "train_pieces": len(train_set),
                                  "vocabulary": res.tokenizer.vocab_size}
            print(label, {n: round(b[n][label]["acc@1"], 4) for n in evals}, flush=True)
    results["B: users 0-9 as a user's own data"] = b
    print_table("B", b)
    finish(results, args, t0)


def finish(results: dict, args, t0: float) -> None:
    results["seconds"] = round(time.perf_counter() - t0)
    Path(args.results).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.results} ({results['seconds']} s)")


def print_table(title: str, block: dict) -> None:
    for name, methods in block.items():
        best = max(methods[m]["acc@1"] for m in ("straight-on", "markov-2", "markov-2+straight-on"))
        print(f"\n{title}: {name}")
        for m, r in methods.items():
            print(f"  {m:34s} acc@1 {r['acc@1']:.3f} ({r['acc@1'] / best:.2f}x)  acc@5 {r['acc@5']:.3f}"
                  f"  mrr {r['mrr']:.3f}  top-1 error {r.get('top1_error_m_median', float('nan')):.0f} m  n={r['n']}")


if __name__ == "__main__":
    main()
