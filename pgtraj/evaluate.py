"""Evaluation protocols and classical baselines, shared by benchmarks/ and training reports.

Next location: on held-out sequences of tokens, predict every next token from its prefix (teacher forcing);
report Acc@1/5/10 and MRR over the full vocabulary. Baselines: popularity, first- and second-order Markov
chains with interpolated (Jelinek-Mercer) smoothing, weights chosen on the validation split.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import torch

from .data import to_tensors
from .features import collate, to_inputs
from .model import TrajectoryModel
from .tokenizer import SPECIAL_TOKENS, Tokens


def ranking_metrics(ranks: np.ndarray) -> dict:
    ranks = np.asarray(ranks, dtype=np.float64)
    return {"acc@1": float(np.mean(ranks <= 1)), "acc@5": float(np.mean(ranks <= 5)),
            "acc@10": float(np.mean(ranks <= 10)), "mrr": float(np.mean(1.0 / ranks)), "n": int(len(ranks))}


def _rank(scores: np.ndarray, target: int) -> int:
    # pessimistic ties: a method that scores everything equally gets no credit for luck
    return int(np.sum(scores >= scores[target]))


class MarkovChain:
    """P(next | last k tokens) = sum_j lambda_j P_j, j = 0 (popularity) .. order, maximum-likelihood P_j."""

    def __init__(self, order: int, vocab_size: int, lambdas: tuple[float, ...] | None = None):
        self.order, self.V = order, vocab_size
        self.lambdas = lambdas or tuple([1.0 / (order + 1)] * (order + 1))
        self.counts = [defaultdict(Counter) for _ in range(order + 1)]

    def fit(self, sequences: list[np.ndarray]) -> "MarkovChain":
        for seq in sequences:
            seq = seq.tolist()
            for i, nxt in enumerate(seq):
                for j in range(self.order + 1):
                    if i >= j:
                        self.counts[j][tuple(seq[i - j:i])][nxt] += 1
        self._pop = self._dist(self.counts[0][()])
        return self

    def _dist(self, c: Counter) -> np.ndarray:
        p = np.zeros(self.V)
        if c:
            keys = np.fromiter(c.keys(), int)
            p[keys] = np.fromiter(c.values(), float)
            p /= p.sum()
        return p

    def scores(self, prefix: list[int]) -> np.ndarray:
        p = self.lambdas[0] * self._pop
        for j in range(1, self.order + 1):
            if len(prefix) >= j:
                c = self.counts[j].get(tuple(prefix[-j:]))
                if c:
                    p = p + self.lambdas[j] * self._dist(c)
        p[: len(SPECIAL_TOKENS)] = -1.0  # never predict a special token
        return p

    def ranks(self, sequences: list[np.ndarray]) -> np.ndarray:
        out = []
        for seq in sequences:
            seq = seq.tolist()
            for i in range(1, len(seq)):
                out.append(_rank(self.scores(seq[:i]), seq[i]))
        return np.array(out)


def tune_markov(order: int, vocab_size: int, train: list[np.ndarray], val: list[np.ndarray]) -> MarkovChain:
    """Pick the interpolation weights with the best validation MRR from a small grid."""
    grid = {1: [(0.05, 0.95), (0.2, 0.8), (0.5, 0.5)],
            2: [(0.02, 0.18, 0.8), (0.05, 0.35, 0.6), (0.1, 0.5, 0.4), (0.05, 0.65, 0.3)]}.get(order, [None])
    best, best_mrr = None, -1.0
    base = MarkovChain(order, vocab_size).fit(train)
    for lam in grid:
        base.lambdas = lam or base.lambdas
        mrr = ranking_metrics(base.ranks(val))["mrr"]
        if mrr > best_mrr:
            best, best_mrr = lam, mrr
    base.lambdas = best or base.lambdas
    return base


def model_ranks(model: TrajectoryModel, encoded: list[Tokens], *, batch_size: int = 32, max_len: int = 512,
                neighbours: np.ndarray | None = None) -> np.ndarray:
    """Rank of each true next token under the model (same positions as MarkovChain.ranks: from the 2nd token).

    With ``neighbours`` (Tokenizer.neighbour_table()), decoding is constrained to the H3 grid: the cells next
    to the current one are ranked first (by the model's scores), every other cell after them, so a target off
    the grid path stays reachable, just ranked lower."""
    model.eval()
    out = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        b = to_tensors(collate([to_inputs(x) for x in chunk], max_len=max_len))
        with torch.no_grad():
            logits, _ = model.next_logits(**b)
        logits[..., : len(SPECIAL_TOKENS)] = -torch.inf
        for row, x in enumerate(chunk):
            n = min(len(x.tokens), max_len - 1)
            # position p (BOS at 0) holds token p-1 and predicts token p; score predictions of tokens 1..n-1
            lg = logits[row, 1:n].numpy()
            tgt = x.tokens[1:n]
            if neighbours is not None:
                near = np.zeros_like(lg, dtype=bool)
                rows_ = np.repeat(np.arange(n - 1), neighbours.shape[1])
                near[rows_, neighbours[x.tokens[: n - 1]].reshape(-1)] = True
                near[:, 0] = False  # PAD fills the table's short rows
                lg = np.where(near, lg + 1e6, lg)
            out.extend(int(np.sum(lg[k] >= lg[k, t])) for k, t in enumerate(tgt))
    return np.array(out)
