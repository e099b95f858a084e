"""Fine-tuning heads from the shipped base model vs from scratch, judged on people no training read.

    .venv/bin/python benchmarks/downstream_unseen.py [--steps 300] [--fractions 0.01,0.1,1]

Each head is fine-tuned twice with the same budget (--steps, small shape, CPU): from pgtraj-base
(pgtraj/assets/base) and from random init, on all of its training data and, for destination and mode, on
shares of it (--fractions: the few-shot curve; a share is a random subset of the training pieces,
validation stays whole).
- Destination (the trip's last cell from the first half of its fixes) and travel time (of a route whose
  timing is hidden): fine-tuned on users 0-9's train split; judged on the unseen users 120-139 (never read
  by any training) and on users 0-9's test split. Baselines fit on the same training data: destinations seen
  from the current cell (backing off to the first cell, popularity); log-linear regression on route length.
- Transport mode: fine-tuned on the labelled segments of users 10, 20, 52, 62, 75 and 112; judged on user
  126's, the one unseen user who labelled trips. Baseline: softmax regression on speed statistics.
- Trajectory-user linking (which of users 0-9): the task needs the users' own trips in training, so it is
  judged on their test split; the base model never saw users 0-9. Baseline: naive Bayes over cells.
Writes benchmarks/results/downstream_unseen.json.
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
from pgtraj.core.splits import GEOLIFE_FINETUNE_USERS, GEOLIFE_UNSEEN_USERS, UNSEEN
from pgtraj.core.trajectory import Trajectory
from pgtraj.db.datasets import GEOLIFE_MODES, default_data_dir, read_geolife_files
from pgtraj.learn.downstream import (
    CellNaiveBayes,
    DestinationBaseline,
    RouteRegression,
    SoftmaxRegression,
    classification_metrics,
    destination_eval,
    elapsed_s,
    head,
    model_class_scores,
    model_destination_scores,
    model_travel_time_s,
    speed_features,
    tail,
    travel_time_metrics,
)
from pgtraj.learn.pretrained import Pretrained
from pgtraj.learn.train import TrainConfig, train
from unseen import MAX_LEN, base_init, fine_tune_config, sample  # benchmarks/unseen.py, beside this script

MODE_TRAIN_USERS, MODE_UNSEEN_USER = [10, 20, 52, 62, 75, 112], 126
EVAL_TRAJS = 800


def mode_segments(g) -> tuple[dict, dict]:
    """{user: [cleaned one-mode segments]} of the labelled users, and {segment id: mode}. Cleaned without
    the mode: its speed limits would leak the label."""
    by_user: dict[int, list] = {}
    for tr, user in zip(g.trajectories, g.user.tolist()):
        by_user.setdefault(user, []).append(tr)
    segments, labels = {}, {}
    for n, row in enumerate(g.labels):
        user, s, e, mode = row["user_id"], float(row["start_ts"]), float(row["end_ts"]), row["mode"]
        if mode not in GEOLIFE_MODES or user not in by_user:
            continue
        for tr in by_user[user]:
            if tr.t[0] <= e and tr.t[-1] >= s:
                inside = (tr.t >= s) & (tr.t <= e)
                if inside.sum() >= 10:
                    seg = Trajectory(n, tr.t[inside], tr.lat[inside], tr.lon[inside], tr.part)
                    segments.setdefault(user, []).extend(clean(seg, CleaningConfig()))
                    labels[n] = GEOLIFE_MODES[mode]
    return segments, labels


def aligned(scores: np.ndarray, model_classes: list, classes: list) -> np.ndarray:
    """A model's class scores in the order of ``classes``; a class its training share lacked scores -inf."""
    out = np.full((len(scores), len(classes)), -np.inf)
    for j, c in enumerate(classes):
        if c in model_classes:
            out[:, j] = scores[:, model_classes.index(c)]
    return out


def fine_tune(objective: str, train_set: list, val_set: list, out: Path, steps: int, init: Pretrained | None,
              card: dict, labels: dict | None = None):
    shutil.rmtree(out, ignore_errors=True)  # a benchmark starts from nothing (train() would resume)
    cfg = fine_tune_config(objective, steps, card, from_base=init is not None)
    return train(train_set, val_set, TrainConfig.from_dict(cfg), out, labels=labels, progress=False,
                 log=lambda m: None, init=init)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--fractions", default="0.1,1")
    ap.add_argument("--out", default="pgtraj-output/bench/downstream_unseen")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, tok, card = load(ASSET_DIR)
    init = base_init(model, tok, card)
    users = [*GEOLIFE_FINETUNE_USERS, *MODE_TRAIN_USERS, *GEOLIFE_UNSEEN_USERS]
    g = read_geolife_files(default_data_dir() / "geolife", users)
    P: dict[str, list] = {}
    for tr, user, split in zip(g.trajectories, g.user.tolist(), g.split.tolist()):
        if user in GEOLIFE_FINETUNE_USERS or split == UNSEEN:
            P.setdefault(split, []).extend(clean(tr, CleaningConfig()))
    evals = {"unseen users 120-139": sample(P[UNSEEN], EVAL_TRAJS),
             "own users 0-9 (test split)": sample(P["test"], EVAL_TRAJS)}
    fractions = [float(f) for f in args.fractions.split(",")]
    results: dict = {"steps": args.steps, "base": {k: card[k] for k in ("steps", "parameters", "built")}}
    seconds: dict = {}

    def runs(task: str, objective: str, train_set: list, val_set: list, labels=None, shares=(1.0,)):
        """(label, result) of every fine-tuning run of a task."""
        for fraction in shares:
            part = train_set if fraction >= 1 else sample(train_set, max(8, round(fraction * len(train_set))), 1)
            for how, pre in (("from pgtraj-base", init), ("from scratch", None)):
                t = time.perf_counter()
                r = fine_tune(objective, part, val_set, Path(args.out) / f"{task}-{how.split()[-1]}-{fraction}",
                              args.steps, pre, card, labels)
                label = f"{how}, {fraction:.0%} of the data ({len(part)} pieces)"
                seconds[f"{task}: {label}"] = round(time.perf_counter() - t, 1)
                print(task, label, flush=True)
                yield label, r

    # destination ------------------------------------------------------------------------------------------
    enc_train = [tail(tok.encode(p), MAX_LEN - 1) for p in P["train"]]
    dest = DestinationBaseline().fit([x.tokens for x in enc_train])
    results["destination (half the trip shown)"] = block = {}
    for name, pieces in evals.items():
        block[name] = {"baseline (destination | current cell)": destination_eval(
            lambda ps: np.stack([dest.scores(p.tokens, tok.vocab_size) for p in ps]), tok,
            [tail(tok.encode(p), MAX_LEN - 1) for p in pieces], 0.5)}
    for label, r in runs("destination", "destination", P["train"], P["val"], shares=fractions):
        for name, pieces in evals.items():
            block[name][label] = destination_eval(lambda ps, m=r.model: model_destination_scores(m, ps), r.tokenizer,
                                                  [tail(r.tokenizer.encode(p), MAX_LEN - 1) for p in pieces], 0.5)

    # travel time ------------------------------------------------------------------------------------------
    def routes(tokenizer, pieces):
        return [x for x in (head(tokenizer.encode(p), MAX_LEN - 1) for p in pieces) if len(x.tokens) >= 2]

    reg = RouteRegression().fit(routes(tok, P["train"]))
    results["travel time"] = block = {}
    for name, pieces in evals.items():
        enc = routes(tok, pieces)
        block[name] = {"baseline (log-linear in route length and cells)": travel_time_metrics(
            reg.predict_s(enc), np.array([elapsed_s(x) for x in enc]))}
    for label, r in runs("travel_time", "travel_time", P["train"], P["val"]):
        for name, pieces in evals.items():
            enc = routes(r.tokenizer, pieces)
            block[name][label] = travel_time_metrics(model_travel_time_s(r.model, enc),
                                                     np.array([elapsed_s(x) for x in enc]))

    # transport mode: trained on six labelled users, judged on the unseen one ---------------------------------
    segments, modes = mode_segments(g)
    train_segs = [s for u in MODE_TRAIN_USERS for s in segments.get(u, [])]
    classes = sorted({modes[s.id] for s in train_segs})
    index = {c: i for i, c in enumerate(classes)}
    test_segs = [s for s in segments.get(MODE_UNSEEN_USER, []) if modes[s.id] in index]
    y = np.array([index[modes[s.id]] for s in test_segs])
    held = {id(s) for s in sample(train_segs, max(20, len(train_segs) // 10), 2)}
    val_segs = [s for s in train_segs if id(s) in held]
    fit_segs = [s for s in train_segs if id(s) not in held]
    sr = SoftmaxRegression().fit(np.stack([speed_features(s) for s in fit_segs]),
                                 np.array([index[modes[s.id]] for s in fit_segs]), len(classes))
    results["transport mode (user 126)"] = block = {
        "classes": classes, "segments": {"train": len(fit_segs), "val": len(val_segs), "test": len(test_segs)},
        "baseline (softmax regression on speed statistics)": classification_metrics(
            sr.scores(np.stack([speed_features(s) for s in test_segs])), y)}
    for label, r in runs("mode", "classify", fit_segs, val_segs, modes, shares=fractions):
        block[label] = classification_metrics(aligned(model_class_scores(
            r.model, [head(r.tokenizer.encode(s), MAX_LEN - 1) for s in test_segs]), r.classes, classes), y)

    # trajectory-user linking among users 0-9 (their own test split) ------------------------------------------
    owner = {t.id: str(t.id // 100000) for t in (*P["train"], *P["val"], *P["test"])}
    link_classes = sorted({owner[t.id] for t in P["train"]})
    li = {c: i for i, c in enumerate(link_classes)}
    test = [t for t in P["test"] if owner[t.id] in li]
    yl = np.array([li[owner[t.id]] for t in test])
    nb = CellNaiveBayes().fit([head(tok.encode(t), MAX_LEN - 1).tokens for t in P["train"]],
                              np.array([li[owner[t.id]] for t in P["train"]]), len(link_classes), tok.vocab_size)
    results["user linking (users 0-9)"] = block = {
        "baseline (naive Bayes over cells)": classification_metrics(
            nb.scores([head(tok.encode(t), MAX_LEN - 1).tokens for t in test]), yl)}
    for label, r in runs("linking", "classify", P["train"], P["val"], owner):
        block[label] = classification_metrics(aligned(model_class_scores(
            r.model, [head(r.tokenizer.encode(t), MAX_LEN - 1) for t in test]), r.classes, link_classes), yl)

    results.update(seconds=seconds, wall_seconds=round(time.perf_counter() - t0))
    path = Path(__file__).parent / "results" / "downstream_unseen.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
