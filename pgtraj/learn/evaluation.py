"""Evaluation protocols and classical baselines, shared by benchmarks/ and training reports.

Next location: on held-out sequences of tokens, predict every next token from its prefix (teacher forcing);
report Acc@1/5/10 and MRR over the full vocabulary. Baselines: popularity, first- and second-order Markov
chains with interpolated (Jelinek-Mercer) smoothing, weights chosen on the validation split.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import torch

from pgtraj.core.features import collate, to_inputs
from pgtraj.core.tokenizer import MASK, SPECIAL_TOKENS, Tokens
from pgtraj.learn.batches import in_batches, to_tensors
from pgtraj.learn.model import TrajectoryModel


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
    for chunk, b in in_batches(encoded, batch_size, max_len):
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


# ---------------------------------------------------------------------------------------------------------
# Similarity search, t2vec / TrajCL protocol: a query is made of a trajectory's odd fixes, its twin of the
# even ones; the twin hides among a database of other trajectories. Mean rank of the twin (ideal 1.0), HR@k.

def split_odd_even(tr):
    """(query, twin) of one trajectory: its odd-indexed and even-indexed fixes."""
    return tr.take(slice(1, None, 2)), tr.take(slice(0, None, 2))


def twin_ranks(distance: np.ndarray) -> np.ndarray:
    """distance (Q, D) with the twin of query i in column i -> rank of each twin (1 = nearest)."""
    own = distance[np.arange(len(distance)), np.arange(len(distance))]
    return 1 + np.sum(distance < own[:, None], axis=1)


def search_metrics(ranks: np.ndarray) -> dict:
    return {"mean_rank": float(np.mean(ranks)), "hr@1": float(np.mean(ranks <= 1)), "hr@5": float(np.mean(ranks <= 5)),
            "queries": int(len(ranks))}


def _pairwise_m(a, b) -> np.ndarray:
    """Distances in metres between the fixes of a and b, in one equirectangular frame for both (a frame per
    trajectory would put the same place at different coordinates): fine within a city."""
    lat0 = np.radians((np.mean(a.lat) + np.mean(b.lat)) / 2)

    def xy(tr):
        return np.stack([np.radians(tr.lon) * np.cos(lat0), np.radians(tr.lat)], axis=1) * 6_371_008.8

    pa, pb = xy(a), xy(b)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))


def dtw(a, b) -> float:
    """Exact dynamic time warping on point distances (metres), O(nm), one row at a time."""
    c = _pairwise_m(a, b)
    prev = np.full(c.shape[1] + 1, np.inf)
    prev[0] = 0.0
    for i in range(c.shape[0]):
        cur = np.full_like(prev, np.inf)
        # cur[j+1] = c[i,j] + min(prev[j], prev[j+1], cur[j]): the last term is sequential
        best = np.minimum(prev[:-1], prev[1:])
        for j in range(c.shape[1]):
            cur[j + 1] = c[i, j] + min(best[j], cur[j])
        prev = cur
    return float(prev[-1])


def frechet(a, b) -> float:
    """Exact discrete Fréchet distance (metres)."""
    c = _pairwise_m(a, b)
    prev = np.full(c.shape[1], np.inf)
    for i in range(c.shape[0]):
        cur = np.empty(c.shape[1])
        for j in range(c.shape[1]):
            reach = 0.0 if i == 0 and j == 0 else min(prev[j], cur[j - 1] if j else np.inf,
                                                      prev[j - 1] if j else np.inf)
            cur[j] = max(reach, c[i, j])
        prev = cur
    return float(prev[-1])


def edr(a, b, eps_m: float = 100.0) -> float:
    """Edit distance on real sequences: points match within ``eps_m`` metres; normalised by the longer length."""
    match = _pairwise_m(a, b) <= eps_m
    n, m = match.shape
    prev = np.arange(m + 1, dtype=float)
    for i in range(1, n + 1):
        cur = np.empty(m + 1)
        cur[0] = i
        for j in range(1, m + 1):
            cur[j] = min(prev[j - 1] + (0 if match[i - 1, j - 1] else 1), prev[j] + 1, cur[j - 1] + 1)
        prev = cur
    return float(prev[-1] / max(n, m))


def distance_matrix(queries, database, fn) -> np.ndarray:
    return np.array([[fn(q, d) for d in database] for q in queries])


# ---------------------------------------------------------------------------------------------------------
# Masked-span recovery (metres) and next-cell perplexity.

def cell_centres(tok, tokens: np.ndarray) -> np.ndarray:
    """(n, 2) lat/lon of the cells that tokens stand for (NaN for special tokens)."""
    import h3.api.numpy_int as h3i

    out = np.full((len(tokens), 2), np.nan)
    for i, t in enumerate(np.asarray(tokens).tolist()):
        if t >= len(SPECIAL_TOKENS):
            out[i] = h3i.cell_to_latlng(tok.token_cell(t))
    return out


def span_recovery(model: TrajectoryModel, tok, encoded: list[Tokens], *, seed: int = 0, max_len: int = 512) -> dict:
    """Hide spans (MaskedSpans' masking), recover them with the model's masked-token head, and measure the
    distance from each recovered cell centre to the true fine cell's centre; the baseline moves linearly
    (in time) between the known cells on either side of the span."""
    import h3.api.numpy_int as h3i

    from pgtraj.core.trajectory import haversine_m
    from pgtraj.learn.tasks.masked_spans import MaskedSpans

    model.eval()
    masker = MaskedSpans(model)
    gen = torch.Generator().manual_seed(seed)
    err_model, err_linear = [], []
    for x in encoded:
        b = to_tensors(collate([to_inputs(x)], max_len=max_len))
        tokens = b["tokens"]
        masked = masker.mask(tokens, gen)
        masked[0, -1] = masked[0, 1] = False  # keep both ends known so the baseline can interpolate
        if not masked.any():
            continue
        with torch.no_grad():  # every hidden token shows MASK (no 80/10/10 at evaluation)
            logits = masker.masked_logits(torch.where(masked, torch.full_like(tokens, MASK), tokens), b, masked)
        logits[:, : len(SPECIAL_TOKENS)] = -torch.inf
        idx = masked[0].nonzero().squeeze(-1).numpy() - 1    # positions in x (BOS is input position 0)
        true = np.array([h3i.cell_to_latlng(int(c)) for c in x.cells[idx]])
        pred = cell_centres(tok, logits.argmax(-1).numpy())
        err_model.extend(haversine_m(true[:, 0], true[:, 1], pred[:, 0], pred[:, 1]).tolist())
        known = np.setdiff1d(np.arange(min(len(x), max_len - 1)), idx)
        kc = np.array([h3i.cell_to_latlng(int(c)) for c in x.cells[known]])
        lin_lat = np.interp(x.t[idx], x.t[known], kc[:, 0])
        lin_lon = np.interp(x.t[idx], x.t[known], kc[:, 1])
        err_linear.extend(haversine_m(true[:, 0], true[:, 1], lin_lat, lin_lon).tolist())
    em, el = np.array(err_model), np.array(err_linear)
    return {"masked_tokens": int(len(em)),
            "model_m": {"mean": float(em.mean()), "median": float(np.median(em))},
            "linear_interpolation_m": {"mean": float(el.mean()), "median": float(np.median(el))}}


def perplexity(model: TrajectoryModel, encoded: list[Tokens], *, batch_size: int = 32, max_len: int = 512) -> float:
    """exp(mean negative log-likelihood) of every next token (same positions as model_ranks)."""
    model.eval()
    nll, n = 0.0, 0
    for chunk, b in in_batches(encoded, batch_size, max_len):
        with torch.no_grad():
            logp = torch.log_softmax(model.next_logits(**b)[0], dim=-1)
        for row, x in enumerate(chunk):
            k = min(len(x.tokens), max_len - 1)
            tgt = torch.from_numpy(x.tokens[1:k].astype(np.int64))
            nll -= float(logp[row, 1:k].gather(1, tgt[:, None]).sum())
            n += len(tgt)
    return float(np.exp(nll / max(n, 1)))
