"""The one definition of train/validation/test splits, reused by every loader, training run and evaluation.

Splits are **chronological within each entity** (a user, a vehicle): each entity's trajectories, ordered by
start time, go 70% / 10% / 20% to train / val / test, so a model is always evaluated on trips that happen
after the ones it learnt from, for people it has seen (the next-location protocol). ``entity_split`` holds out
whole entities instead, for measuring generalisation to unseen users. ``timeline_split`` is the chronological
split for data that comes as a few long tracks per entity (a tagged animal, a ship): each entity's timeline
is cut where 70% and 80% of its fixes lie behind, cutting the trips that span a cut.

The GeoLife protocol (../shared/data/geolife, users 0-139) adds a user-level holdout that every benchmark
leads with: users 120-139 are **unseen** (their split is ``"unseen"``) and nothing is ever fitted on them
(no pretraining, tokenizer or fine-tuning); users 10-119 are what the shipped base model is pretrained on;
users 0-9 stand for "your data", what the main job and the few-shot benchmarks fine-tune on, so that
fine-tuning, too, meets people the base model never saw.
"""

from __future__ import annotations

import hashlib

import numpy as np

FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
NAMES = np.array(list(FRACTIONS))
UNSEEN = "unseen"

GEOLIFE_UNSEEN_USERS = range(120, 140)
GEOLIFE_PRETRAIN_USERS = range(10, 120)
GEOLIFE_FINETUNE_USERS = range(0, 10)


def geolife_split(user: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Split name per GeoLife trajectory: ``"unseen"`` for the held-out users, else chronological."""
    user = np.asarray(user)
    out = chronological_split(user, start)
    out[np.isin(user, list(GEOLIFE_UNSEEN_USERS))] = UNSEEN
    return out


def chronological_split(entity: np.ndarray, start: np.ndarray, fractions: dict = FRACTIONS) -> np.ndarray:
    """Split name per trajectory: within each entity, earliest ``train`` share first, latest ``test`` last."""
    entity, start = np.asarray(entity), np.asarray(start, dtype=np.float64)
    out = np.empty(len(entity), dtype=object)
    bounds = np.cumsum(list(fractions.values()))
    order = np.lexsort((start, entity))  # by entity, then time
    ent_sorted = entity[order]
    first = np.flatnonzero(np.concatenate([[True], ent_sorted[1:] != ent_sorted[:-1]]))
    sizes = np.diff(np.concatenate([first, [len(order)]]))
    rank = np.arange(len(order)) - np.repeat(first, sizes)        # position within the entity
    frac = (rank + 0.5) / np.repeat(sizes, sizes)                 # its quantile in time
    out[order] = NAMES[np.minimum(np.searchsorted(bounds, frac, side="right"), len(NAMES) - 1)]
    return out


def entity_split(entity: np.ndarray, fractions: dict = FRACTIONS, salt: str = "pgtraj") -> np.ndarray:
    """Split name per trajectory: whole entities held out, in the order of a stable hash of their ids (so
    the same data splits the same way on every run), with at least one entity in val and one in test when
    there are three or more."""
    entity = np.asarray(entity).tolist()
    uniq = sorted(set(entity), key=lambda e: hashlib.sha256(f"{salt}:{e}".encode()).digest())
    n = len(uniq)
    n_val = max(1, round(fractions["val"] * n)) if n >= 3 else 0
    n_test = max(1, round(fractions["test"] * n)) if n >= 3 else 0
    names = ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    where = dict(zip(uniq, names))
    return np.array([where[e] for e in entity], dtype=object)


def timeline_split(pieces: list, entity: list, fractions: dict = FRACTIONS) -> dict[str, list]:
    """{'train': [...], 'val': [...], 'test': [...]}: each entity's pieces (Trajectory, any order) cut at the
    times by which ``fractions`` of its fixes have happened; a piece spanning a cut is cut there."""
    out: dict[str, list] = {name: [] for name in fractions}
    bounds = np.cumsum(list(fractions.values()))[:-1]
    by_entity: dict = {}
    for piece, e in zip(pieces, entity):
        by_entity.setdefault(e, []).append(piece)
    for group in by_entity.values():
        t = np.sort(np.concatenate([p.t for p in group]))
        cuts = t[np.minimum(np.round(bounds * len(t)).astype(np.int64), len(t) - 1)]  # the first fix after each cut
        for p in group:
            which = np.searchsorted(cuts, p.t, side="right")
            for k, name in enumerate(fractions):
                part = which == k
                if part.all():
                    out[name].append(p)
                elif part.any():
                    out[name].append(p.take(part))
    return out
