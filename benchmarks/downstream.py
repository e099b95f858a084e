"""Fine-tuning heads on GeoLife against classical baselines: destination, trajectory-user linking, transport
mode, travel time. Each head is trained twice, from the hybrid-pretrained checkpoint of
benchmarks/next_location.py and from random init, for the same number of steps.

    .venv/bin/python benchmarks/next_location.py      # first: writes the pretrained checkpoint
    .venv/bin/python benchmarks/downstream.py [--dsn URL] [--steps N]

Data: users 0-9 (geolife.trajectories, chronological splits) for destination, user linking and travel
time. Transport modes come from users who labelled their trips; their label intervals are cut into
segments (one mode each) in a schema of their own, split chronologically per user. Those users are not
in the pretraining data: the mode result also measures transfer to unseen people and places.
Writes benchmarks/results/downstream.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import psycopg

from pgtraj.app.training import read_split
from pgtraj.core.clean import CleaningConfig, CleaningReport, clean
from pgtraj.core.splits import chronological_split
from pgtraj.db.connection import connect, resolve_dsn
from pgtraj.db.datasets import GEOLIFE_MODES, default_data_dir, load_geolife
from pgtraj.db.readers import QuerySource, TrajectoryReader
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
from pgtraj.learn.train import TrainConfig, train

LABELLED_USERS = [10, 20, 52, 62, 75, 112, 126]
SEGMENTS = """
SELECT l.seg_id, ST_SetSRID(ST_MakeLine(ST_MakePointM(p.lon, p.lat, p.ts_epoch) ORDER BY p.ts_epoch), 4326)
FROM (SELECT row_number() OVER (ORDER BY user_id, start_ts) AS seg_id, user_id,
             extract(epoch FROM start_ts) AS s, extract(epoch FROM end_ts) AS e FROM geolife_modes.labels) l
JOIN geolife_modes.points p ON p.user_id = l.user_id AND p.ts_epoch BETWEEN l.s AND l.e
GROUP BY l.seg_id
"""
SEGMENT_INFO = """
SELECT row_number() OVER (ORDER BY user_id, start_ts), user_id, extract(epoch FROM start_ts), mode
FROM geolife_modes.labels"""


def mode_segments(conn: psycopg.Connection) -> tuple[dict, dict]:
    """{split: [pieces]} of the labelled segments and {segment id: mode}."""
    if conn.execute("SELECT to_regclass('geolife_modes.points') IS NULL").fetchone()[0]:
        load_geolife(conn, default_data_dir() / "geolife", schema="geolife_modes", users=LABELLED_USERS, progress=False,
                     log=lambda m: None)
        conn.execute("CREATE INDEX ON geolife_modes.points (user_id, ts_epoch)")
        conn.commit()
    info = conn.execute(SEGMENT_INFO).fetchall()
    labels = {int(i): GEOLIFE_MODES[m] for i, _, _, m in info if m in GEOLIFE_MODES}
    split = dict(zip((int(r[0]) for r in info),
                     chronological_split(np.array([r[1] for r in info]), np.array([float(r[2]) for r in info]))))
    out = {"train": [], "val": [], "test": []}
    report = CleaningReport()
    for tr in TrajectoryReader(conn, QuerySource(SEGMENTS)):
        if tr.id in labels:  # cleaned without the mode: its speed limits would leak the label
            out[split[tr.id]] += clean(tr, CleaningConfig(), report)
    return out, labels


def fine_tune(objective: str, splits: dict, out: Path, steps: int, base: dict, pretrained: Path | None,
              labels: dict | None = None):
    cfg = {**base, "objective": objective, "steps": steps}
    if pretrained is not None:
        cfg["init_from"] = str(pretrained)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    r = train(splits["train"], splits["val"], TrainConfig.from_dict(cfg), out, labels=labels, progress=False,
              log=lambda m: None)
    return r, round(time.perf_counter() - t0, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--pretrained", default="pgtraj-output/bench/pretrain/checkpoint.pt")
    ap.add_argument("--out", default="pgtraj-output/bench/downstream")
    args = ap.parse_args()
    pretrained, out = Path(args.pretrained), Path(args.out)
    if not pretrained.exists():
        raise SystemExit(f"{pretrained} not found: run benchmarks/next_location.py first")
    ckpt_cfg = json.loads(json.dumps(__import__("torch").load(pretrained, weights_only=False)["train_config"]))
    base = {k: ckpt_cfg[k] for k in ("preset", "model", "tokenizer", "max_len", "batch_size")}
    base.update(lr=1e-3, warmup=50, eval_every=250, eval_batches=4)
    max_len = base["max_len"]
    with connect(resolve_dsn(args.dsn)) as conn:
        splits = {s: read_split(conn, "geolife.trajectories", s, id_column="traj_id", traj_column="geom",
                                split_column="split", log=lambda m: None) for s in ("train", "val", "test")}
        mode_splits, mode_labels = mode_segments(conn)
    results, seconds = {}, {}

    def both(task: str, objective: str, data: dict, labels: dict | None = None) -> dict:
        runs = {}
        for init, ck in (("pretrained", pretrained), ("random init", None)):
            runs[init], seconds[f"{task} ({init})"] = fine_tune(objective, data, out / f"{task}-{init}".replace(" ", "_"),
                                                                args.steps, base, ck, labels)
        return runs

    # destination -----------------------------------------------------------------------------------------
    runs = both("destination", "destination", splits)
    tok = runs["pretrained"].tokenizer
    enc = {s: [tail(tok.encode(p), max_len - 1) for p in v] for s, v in splits.items()}
    baseline = DestinationBaseline().fit([x.tokens for x in enc["train"]])
    results["destination"] = {}
    for frac in (0.25, 0.5, 0.75):
        row = {"baseline (destination | current cell)": destination_eval(
            lambda ps: np.stack([baseline.scores(p.tokens, tok.vocab_size) for p in ps]), tok, enc["test"], frac)}
        for init, r in runs.items():
            test = [tail(r.tokenizer.encode(p), max_len - 1) for p in splits["test"]]
            row[f"model ({init})"] = destination_eval(lambda ps, m=r.model: model_destination_scores(m, ps),
                                                      r.tokenizer, test, frac)
        results["destination"][f"{int(frac * 100)}% shown"] = row

    # trajectory-user linking (users 0-9) ---------------------------------------------------------------------
    users = {t.id: str(t.id // 100000) for v in splits.values() for t in v}  # traj_id = user * 100000 + file
    runs = both("user_linking", "classify", splits, users)
    classes = runs["pretrained"].classes
    index = {c: i for i, c in enumerate(classes)}
    test = [t for t in splits["test"] if users[t.id] in index]
    y = np.array([index[users[t.id]] for t in test])
    def head_enc(trs, tokenizer=tok):
        return [head(tokenizer.encode(t), max_len - 1) for t in trs]

    train_lab = [t for t in splits["train"] if users[t.id] in index]
    nb = CellNaiveBayes().fit([x.tokens for x in head_enc(train_lab)], np.array([index[users[t.id]] for t in train_lab]),
                              len(classes), tok.vocab_size)
    results["user_linking"] = {"classes": len(classes),
                               "baseline (naive Bayes over cells)": classification_metrics(nb.scores(
                                   [x.tokens for x in head_enc(test)]), y)}
    for init, r in runs.items():
        results["user_linking"][f"model ({init})"] = classification_metrics(
            model_class_scores(r.model, head_enc(test, r.tokenizer)), y)

    # transport mode (labelled users, not seen in pretraining) ---------------------------------------------------
    runs = both("mode", "classify", mode_splits, mode_labels)
    classes = runs["pretrained"].classes
    index = {c: i for i, c in enumerate(classes)}
    lab = {s: [t for t in v if mode_labels[t.id] in index] for s, v in mode_splits.items()}
    ys = {s: np.array([index[mode_labels[t.id]] for t in v]) for s, v in lab.items()}
    sr = SoftmaxRegression().fit(np.stack([speed_features(t) for t in lab["train"]]), ys["train"], len(classes))
    results["mode"] = {"classes": classes, "segments": {s: len(v) for s, v in lab.items()},
                       "baseline (softmax regression on speed statistics)": classification_metrics(
                           sr.scores(np.stack([speed_features(t) for t in lab["test"]])), ys["test"])}
    for init, r in runs.items():
        assert r.classes == classes
        results["mode"][f"model ({init})"] = classification_metrics(
            model_class_scores(r.model, head_enc(lab["test"], r.tokenizer)), ys["test"])

    # travel time (users 0-9) ------------------------------------------------------------------------------------
    runs = both("travel_time", "travel_time", splits)
    enc = {s: [x for x in head_enc(v) if len(x.tokens) >= 2] for s, v in splits.items()}
    true = np.array([elapsed_s(x) for x in enc["test"]])
    results["travel_time"] = {"baseline (log-linear in route length and cells)": travel_time_metrics(
        RouteRegression().fit(enc["train"]).predict_s(enc["test"]), true)}
    for init, r in runs.items():
        test = [x for x in head_enc(splits["test"], r.tokenizer) if len(x.tokens) >= 2]
        results["travel_time"][f"model ({init})"] = travel_time_metrics(model_travel_time_s(r.model, test), true)

    summary = {"steps": args.steps, "pretrained": str(pretrained), "config": base, "seconds": seconds,
               "results": results}
    path = Path(__file__).parent / "results" / "downstream.json"
    path.write_text(json.dumps(summary, indent=2))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
