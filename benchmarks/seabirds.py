"""Seabirds: a second domain, read as the point table it is, judged on colonies no training saw.

    .venv/bin/python benchmarks/seabirds.py [--steps 300] [--eval-windows 400]

Data: ../shared/data/seabirds (26 GPS-tagged seabirds, 925,148 fixes, five species, three colonies). Each
bird's fixes are one trajectory, cleaned with pgtraj's data-driven default (CleaningOptions(): thresholds
from the data's own speeds and sampling intervals) and cut into trips where they pause. Protocol:
- trained on: the Peruvian colony (PER_PSC_PSC: 12 birds, LBOU and SVAR), split in time within each bird
  (core.splits.timeline_split: every bird's latest 30% of fixes are val/test);
- unseen: the two Brazilian colonies (BRA_FDN_MEI, BRA_SAN_FRA: 14 birds of three other species, another
  ocean), which no training reads.
Every method works at H3 resolution 9 (the base model's; choose_resolution's own pick is reported).

1. Next cell in true resolution-9 cells (benchmarks/unseen.py's cases and baselines): pgtraj-base as shipped
   (pretrained on people in Beijing), pgtraj-base fine-tuned on the Peruvian birds, the same model trained
   from scratch with the same budget; straight on, Markov-1/2 over true cells (alone and backed off to straight
   on) and a move Markov chain, all fit on the Peruvian birds.
2. Route twin search on the unseen colonies (route_search.py's protocol: odd vs even fixes of windows of
   40-200 fixes, each query moved 1-30 days): the embeddings vs start/end points, and DTW on the first 10.
3. Species of birds no training saw: all 26 birds, whole birds held out (core.splits.entity_split), windows
   of at most 1,000 fixes; `classify` fine-tuned from pgtraj-base and from scratch vs softmax regression on
   speed statistics and vs place alone (the species of the nearest training window); test birds of a species
   no training bird has are left out (and counted).
Writes benchmarks/results/seabirds.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pgtraj.app.base_model import ASSET_DIR, load
from pgtraj.core.clean import CleaningOptions, CleaningReport, clean
from pgtraj.core.splits import entity_split, timeline_split
from pgtraj.core.tokenizer import choose_resolution
from pgtraj.core.trajectory import Trajectory, haversine_m
from pgtraj.db.datasets import default_data_dir
from pgtraj.learn.downstream import SoftmaxRegression, classification_metrics, head, model_class_scores, speed_features
from pgtraj.learn.evaluation import distance_matrix, dtw, search_metrics, split_odd_even, twin_ranks
from pgtraj.learn.export import onnx_embedder

from downstream_unseen import aligned, fine_tune
from route_search import shifted, start_end, windows
from unseen import MAX_LEN, base_init, baselines, model_results, sample

SEEN_COLONY = "PER_PSC_PSC"


def read_birds(path: Path) -> tuple[list[Trajectory], dict, dict]:
    """One trajectory per bird (fixes in time order), and each bird's colony and species."""
    import pyarrow.parquet as pq

    t = pq.read_table(path).to_pydict()
    ids, ts = np.array(t["bird_id"]), np.array(t["ts"], dtype=np.float64)
    lat, lon = np.array(t["lat"]), np.array(t["lon"])
    colony = dict(zip(t["bird_id"], t["colony"]))
    species = dict(zip(t["bird_id"], t["species"]))
    birds = []
    for b in sorted(set(t["bird_id"])):
        m = np.flatnonzero(ids == b)
        m = m[np.argsort(ts[m], kind="stable")]
        birds.append(Trajectory(b, ts[m], lat[m], lon[m]))
    return birds, colony, species


def nearest_place(train_windows: list, y: list, test: list, n_classes: int) -> np.ndarray:
    """Class scores from where a window is: minus the distance (km) from its mean position to the nearest
    training window of each class (species nest in colonies, so place alone says much)."""
    centre = np.array([[w.lat.mean(), w.lon.mean()] for w in train_windows])
    y = np.asarray(y)
    out = np.full((len(test), n_classes), -np.inf)
    for i, w in enumerate(test):
        d = haversine_m(centre[:, 0], centre[:, 1], w.lat.mean(), w.lon.mean()) / 1000.0
        for c in np.unique(y):
            out[i, c] = -d[y == c].min()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(default_data_dir() / "seabirds" / "points.parquet"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-windows", type=int, default=400)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", default="pgtraj-output/bench/seabirds")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    birds, colony, species = read_birds(Path(args.data))
    cleaning, why = CleaningOptions().resolve(birds)
    report = CleaningReport()
    pieces = {b.id: clean(b, cleaning, report) for b in birds}
    c = report.counts
    results: dict = {
        "data": {"birds": len(birds), "fixes": int(sum(len(b) for b in birds)),
                 "colonies": {k: sum(v == k for v in colony.values()) for k in sorted(set(colony.values()))},
                 "species": {k: sum(v == k for v in species.values()) for k in sorted(set(species.values()))}},
        "cleaning": {"thresholds": why, "discarded_share": round(1 - c["points_out"] / c["points_in"], 6),
                     "summary": report.summary()},
        "resolution": {"used": 9, "choose_resolution": choose_resolution(birds)[1]},
        "steps": args.steps}
    print(json.dumps(results, indent=1), flush=True)

    seen = [p for b, ps in pieces.items() if colony[b] == SEEN_COLONY for p in ps]
    split = timeline_split(seen, [p.id for p in seen])
    split = {k: [p for p in v if len(p) >= 5] for k, v in split.items()}
    unseen = [p for b, ps in pieces.items() if colony[b] != SEEN_COLONY for p in ps]
    evals = {"unseen colonies (Brazil)": sample(windows(unseen, 40, 300), args.eval_windows),
             "Peruvian birds' test split": sample(windows(split["test"], 40, 300), args.eval_windows)}
    train_set, val_set = windows(split["train"], 40, 2000), windows(split["val"], 40, 2000)
    results["pieces"] = {"train": len(train_set), "val": len(val_set), **{k: len(v) for k, v in evals.items()}}

    # 1. next cell ----------------------------------------------------------------------------------------
    model, tok, card = load(ASSET_DIR)
    init = base_init(model, tok, card)
    runs = {"pgtraj-base fine-tuned on the Peruvian birds":
            fine_tune("next_cell", train_set, val_set, Path(args.out) / "next-base", args.steps, init, card),
            "from scratch on the Peruvian birds (same budget)":
            fine_tune("next_cell", train_set, val_set, Path(args.out) / "next-scratch", args.steps, None, card)}
    print(f"next-cell models trained ({time.perf_counter() - t0:.0f} s)", flush=True)
    nxt = baselines(tok, train_set, val_set, evals)
    for name, r in model_results(model, tok, evals).items():
        nxt[name]["pgtraj-base as shipped (people, Beijing)"] = r
    for label, r in runs.items():
        for name, res in model_results(r.model, r.tokenizer, evals).items():
            res["token_resolution_shares"] = r.tokenizer.resolution_shares(
                np.concatenate([r.tokenizer.encode(p).tokens for p in evals[name]]))
            nxt[name][label] = res
    results["next cell (true resolution-9 cell)"] = nxt

    # 2. route twin search on the unseen colonies ----------------------------------------------------------
    pool = windows(unseen, 40, 200)
    rng.shuffle(pool)
    pairs = [split_odd_even(t) for t in pool]
    queries = [shifted(q, rng) for q, _ in pairs[:args.queries]]
    database = [d for _, d in pairs]
    search = {"candidates": len(database), "queries": len(queries)}
    for label, (m, tk) in {"pgtraj-base": (model, tok),
                           "pgtraj-base fine-tuned": (runs["pgtraj-base fine-tuned on the Peruvian birds"].model,
                                                      runs["pgtraj-base fine-tuned on the Peruvian birds"].tokenizer),
                           "from scratch": (runs["from scratch on the Peruvian birds (same budget)"].model,
                                            runs["from scratch on the Peruvian birds (same budget)"].tokenizer)
                           }.items():
        embed = onnx_embedder(m, tk, queries[:1])
        ed = embed(database)
        search[f"{label} route embedding"] = search_metrics(twin_ranks(1.0 - embed(queries) @ ed.T))
    search["start/end points"] = search_metrics(twin_ranks(distance_matrix(queries, database, start_end)))
    search["DTW (first 10 queries)"] = search_metrics(twin_ranks(distance_matrix(queries[:10], database, dtw)))
    results["route twin search (unseen colonies, queries moved 1-30 days)"] = search
    print(json.dumps(search, indent=1), flush=True)

    # 3. species of birds no training saw ------------------------------------------------------------------
    ids = sorted(pieces)
    held = dict(zip(ids, entity_split(np.array(ids))))
    win = {s: [w for b in ids if held[b] == s for w in windows(pieces[b], 40, 1000)] for s in ("train", "val", "test")}
    for s, ws in win.items():
        for k, w in enumerate(ws):
            w.id = f"{w.id}#{k}"
    label_of = {w.id: species[w.id.split("#")[0]] for ws in win.values() for w in ws}
    classes = sorted({label_of[w.id] for w in win["train"]})
    index = {c: i for i, c in enumerate(classes)}
    test = [w for w in win["test"] if label_of[w.id] in index]
    y = np.array([index[label_of[w.id]] for w in test])
    sr = SoftmaxRegression().fit(np.stack([speed_features(w) for w in win["train"]]),
                                 np.array([index[label_of[w.id]] for w in win["train"]]), len(classes))
    sp = {"classes": classes, "test_birds": sorted(b for b in ids if held[b] == "test"),
          "windows": {"train": len(win["train"]), "val": len(win["val"]), "test": len(test),
                      "test windows of a species no training bird has": len(win["test"]) - len(test)},
          "baseline (softmax regression on speed statistics)": classification_metrics(
              sr.scores(np.stack([speed_features(w) for w in test])), y),
          "baseline (place alone: the species of the nearest training window)": classification_metrics(
              nearest_place(win["train"], [index[label_of[w.id]] for w in win["train"]], test, len(classes)), y)}
    for label, pre in (("from pgtraj-base", init), ("from scratch", None)):
        r = fine_tune("classify", win["train"], win["val"], Path(args.out) / f"species-{label.split()[-1]}",
                      args.steps, pre, card, labels=label_of)
        sp[label] = classification_metrics(aligned(model_class_scores(
            r.model, [head(r.tokenizer.encode(w), MAX_LEN - 1) for w in test]), r.classes, classes), y)
    results["species of unseen birds"] = sp
    results["wall_seconds"] = round(time.perf_counter() - t0)
    path = Path(__file__).parent / "results" / "seabirds.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k not in ("data",)}, indent=1))
    print(f"wrote {path} ({results['wall_seconds']} s)")


if __name__ == "__main__":
    main()
