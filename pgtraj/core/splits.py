"""The one definition of train/validation/test splits, reused by every loader, training run and evaluation.

Splits are **chronological within each entity** (a user, a vehicle): each entity's trajectories, ordered by
start time, go 70% / 10% / 20% to train / val / test, so a model is always evaluated on trips that happen
after the ones it learnt from, for people it has seen (the next-location protocol). ``entity_split`` holds out
whole entities instead, for measuring generalisation to unseen users.

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
    """Split name per trajectory by a stable hash of its entity: whole entities are held out."""
    bounds = np.cumsum(list(fractions.values()))
    cache: dict = {}

    def bucket(e) -> str:
        if e not in cache:
            h = int.from_bytes(hashlib.sha256(f"{salt}:{e}".encode()).digest()[:8], "big") / 2**64
            cache[e] = str(NAMES[min(int(np.searchsorted(bounds, h, side="right")), len(NAMES) - 1)])
        return cache[e]

    return np.array([bucket(e) for e in np.asarray(entity).tolist()], dtype=object)
