"""Downstream (fine-tuning) tasks: evaluation protocols and the classical baselines each head must beat.

* destination: from the first ``fraction`` of a trip's cells, rank its last cell. Baseline: destinations
  counted per current cell, backing off to per first cell, then to destination popularity.
* classification (trajectory-user linking, transport mode): Acc@1/5 and macro-F1. Baselines: multinomial
  naive Bayes over the cells a trip visits (users), softmax regression on speed statistics (modes).
* travel time: the route is known, its timing hidden; MAE in seconds and MAPE. Baseline: least squares of
  log duration on log route length and log cell count.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import h3.api.numpy_int as h3i
import numpy as np
import torch

from pgtraj.core.tokenizer import SPECIAL_TOKENS, Tokenizer, Tokens
from pgtraj.core.trajectory import Trajectory, haversine_m
from pgtraj.learn.batches import in_batches
from pgtraj.learn.evaluation import _rank, ranking_metrics
from pgtraj.learn.model import TrajectoryModel


def tail(x: Tokens, n: int) -> Tokens:
    """The last ``n`` tokens (what a destination model is trained on for long trips)."""
    return Tokens(*(getattr(x, f)[-n:] for f in Tokens.FIELDS))


def head(x: Tokens, n: int) -> Tokens:
    return Tokens(*(getattr(x, f)[:n] for f in Tokens.FIELDS))


def prefix_length(n: int, fraction: float) -> int:
    """Cells shown of an ``n``-cell trip: at least one, never the last."""
    return int(min(n - 1, max(1, round(fraction * n))))


# --- destination ------------------------------------------------------------------------------------------

class DestinationBaseline:
    """P(destination | current cell), backing off to P(destination | first cell) and to popularity."""

    def fit(self, sequences: list[np.ndarray]) -> "DestinationBaseline":
        self.by_current, self.by_first, self.pop = defaultdict(Counter), defaultdict(Counter), Counter()
        for seq in sequences:
            dest = int(seq[-1])
            self.pop[dest] += 1
            self.by_first[int(seq[0])][dest] += 1
            for c in set(seq[:-1].tolist()):
                self.by_current[c][dest] += 1
        return self

    def scores(self, prefix: np.ndarray, vocab_size: int) -> np.ndarray:
        p = np.zeros(vocab_size)
        for weight, counts in ((1e-6, self.pop), (1e-3, self.by_first.get(int(prefix[0]))),
                               (1.0, self.by_current.get(int(prefix[-1])))):
            if counts:
                keys = np.fromiter(counts.keys(), int)
                vals = np.fromiter(counts.values(), float)
                p[keys] += weight * vals / vals.sum()
        p[: len(SPECIAL_TOKENS)] = -1.0
        return p


def destination_eval(score_fn, tokenizer: Tokenizer, encoded: list[Tokens], fraction: float) -> dict:
    """Ranking metrics of the true last cell's token, the share whose top token is that very cell at full
    resolution, and the distance (m) from the top-ranked cell's centre to the true last cell's centre. ``score_fn(prefixes) -> scores (len(prefixes), V)``."""
    prefixes = [head(x, prefix_length(len(x.tokens), fraction)) for x in encoded if len(x.tokens) >= 2]
    targets = [int(x.tokens[-1]) for x in encoded if len(x.tokens) >= 2]
    scores = score_fn(prefixes)
    ranks = np.array([_rank(s, t) for s, t in zip(scores, targets)])
    # in the user's terms: the top token is the true last cell itself, not a coarse ancestor or UNK
    exact = tokenizer.names_exactly(scores.argmax(-1), np.array([x.cells[-1] for x in encoded if len(x.tokens) >= 2],
                                                                 dtype=np.uint64))
    dist = []
    for s, x in zip(scores, (x for x in encoded if len(x.tokens) >= 2)):
        top = int(np.argmax(s))
        if top >= len(SPECIAL_TOKENS):  # the true end is the trip's own last cell, whatever its token
            (a, b), (c, d) = h3i.cell_to_latlng(tokenizer.token_cell(top)), h3i.cell_to_latlng(int(x.cells[-1]))
            dist.append(float(haversine_m(np.array([a]), np.array([b]), np.array([c]), np.array([d]))[0]))
    return {**ranking_metrics(ranks), "acc@1_true_cell": float(exact.mean()) if len(exact) else None,
            "median_error_m": float(np.median(dist)) if dist else None, "fraction_shown": fraction}


def model_destination_scores(model: TrajectoryModel, prefixes: list[Tokens], batch_size: int = 64) -> np.ndarray:
    model.eval()
    out = []
    for chunk, b in in_batches(prefixes, batch_size):
        with torch.no_grad():
            logits = model.destination_logits(**b)
        last = (b["tokens"] != 0).sum(1) - 1
        lg = logits[torch.arange(len(chunk)), last]
        lg[:, : len(SPECIAL_TOKENS)] = -torch.inf
        out.append(lg.numpy())
    return np.concatenate(out)


# --- classification -----------------------------------------------------------------------------------------

def classification_metrics(scores: np.ndarray, y: np.ndarray) -> dict:
    """Acc@1, Acc@5 (pessimistic ties) and macro-F1 over the classes present in ``y``."""
    ranks = np.array([_rank(s, t) for s, t in zip(scores, y)])
    pred = scores.argmax(1)
    f1 = []
    for c in np.unique(y):
        tp = np.sum((pred == c) & (y == c))
        prec, rec = tp / max(1, np.sum(pred == c)), tp / max(1, np.sum(y == c))
        f1.append(0.0 if tp == 0 else 2 * prec * rec / (prec + rec))
    return {"acc@1": float(np.mean(ranks <= 1)), "acc@5": float(np.mean(ranks <= 5)),
            "macro_f1": float(np.mean(f1)), "n": int(len(y))}


def model_class_scores(model: TrajectoryModel, encoded: list[Tokens], batch_size: int = 64) -> np.ndarray:
    model.eval()
    out = []
    for _, b in in_batches(encoded, batch_size):
        with torch.no_grad():
            out.append(model.classify(**b).numpy())
    return np.concatenate(out)


class CellNaiveBayes:
    """Multinomial naive Bayes over visited cells with add-one smoothing: the classic trajectory-user
    linking baseline (who goes where)."""

    def fit(self, sequences: list[np.ndarray], y: np.ndarray, n_classes: int, vocab_size: int) -> "CellNaiveBayes":
        counts = np.ones((n_classes, vocab_size))
        for seq, c in zip(sequences, y):
            np.add.at(counts[c], seq, 1.0)
        self.log_p = np.log(counts / counts.sum(1, keepdims=True))
        self.log_prior = np.log(np.bincount(y, minlength=n_classes) + 1.0)
        return self

    def scores(self, sequences: list[np.ndarray]) -> np.ndarray:
        return np.stack([self.log_prior + self.log_p[:, seq].sum(1) for seq in sequences])


def speed_features(tr: Trajectory) -> np.ndarray:
    """Per-trip statistics of the raw fixes that transport-mode detection classically relies on (Zheng et
    al. 2008): speed quantiles, acceleration, heading change rate, length and duration."""
    d = haversine_m(tr.lat[:-1], tr.lon[:-1], tr.lat[1:], tr.lon[1:])
    dt = np.maximum(np.diff(tr.t), 1e-3)
    v = d / dt
    acc = np.abs(np.diff(v)) / dt[1:] if len(v) > 1 else np.zeros(1)
    head = np.degrees(np.arctan2(np.diff(tr.lon), np.diff(tr.lat)))
    turn = np.abs((np.diff(head) + 180) % 360 - 180) if len(head) > 1 else np.zeros(1)
    q = np.percentile(v, [50, 85, 95]) if len(v) else np.zeros(3)
    return np.array([np.mean(v) if len(v) else 0.0, *q, np.std(v) if len(v) else 0.0,
                     np.percentile(acc, 90), np.mean(turn > 30), np.log1p(d.sum()), np.log1p(tr.t[-1] - tr.t[0])])


class SoftmaxRegression:
    """Multinomial logistic regression on standardised features, full-batch gradient descent (numpy)."""

    def fit(self, X: np.ndarray, y: np.ndarray, n_classes: int, *, steps: int = 2000, lr: float = 0.5,
            l2: float = 1e-3) -> "SoftmaxRegression":
        self.mu, self.sd = X.mean(0), X.std(0) + 1e-9
        Z = np.hstack([(X - self.mu) / self.sd, np.ones((len(X), 1))])
        self.W = np.zeros((Z.shape[1], n_classes))
        Y = np.eye(n_classes)[y]
        for _ in range(steps):
            P = _softmax(Z @ self.W)
            self.W -= lr * (Z.T @ (P - Y) / len(Z) + l2 * self.W)
        return self

    def scores(self, X: np.ndarray) -> np.ndarray:
        return _softmax(np.hstack([(X - self.mu) / self.sd, np.ones((len(X), 1))]) @ self.W)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# --- travel time --------------------------------------------------------------------------------------------

def elapsed_s(x: Tokens) -> float:
    """Seconds from entering the first cell to entering the last (what the travel-time head predicts)."""
    return float(x.t[-1] - x.t[0])


def route_length_m(x: Tokens) -> float:
    ll = np.array([h3i.cell_to_latlng(int(c)) for c in x.cells]).reshape(-1, 2)
    return float(haversine_m(ll[:-1, 0], ll[:-1, 1], ll[1:, 0], ll[1:, 1]).sum()) if len(ll) > 1 else 0.0


class RouteRegression:
    """log1p(duration) ~ a + b log1p(route length) + c log1p(cells): speed as a function of trip size."""

    @staticmethod
    def _X(encoded: list[Tokens]) -> np.ndarray:
        return np.array([[1.0, np.log1p(route_length_m(x)), np.log1p(len(x.tokens))] for x in encoded])

    def fit(self, encoded: list[Tokens]) -> "RouteRegression":
        y = np.log1p([elapsed_s(x) for x in encoded])
        self.coef, *_ = np.linalg.lstsq(self._X(encoded), y, rcond=None)
        return self

    def predict_s(self, encoded: list[Tokens]) -> np.ndarray:
        return np.expm1(self._X(encoded) @ self.coef)


def model_travel_time_s(model: TrajectoryModel, encoded: list[Tokens], batch_size: int = 64) -> np.ndarray:
    model.eval()
    out = []
    for _, b in in_batches(encoded, batch_size):
        with torch.no_grad():
            out.append(torch.expm1(model.travel_time(**b)).numpy())
    return np.concatenate(out)


def travel_time_metrics(pred_s: np.ndarray, true_s: np.ndarray) -> dict:
    err = np.abs(pred_s - true_s)
    return {"mae_s": float(err.mean()), "median_ae_s": float(np.median(err)),
            "mape_pct": float(100 * np.mean(err / np.maximum(true_s, 60.0))), "n": int(len(true_s))}
