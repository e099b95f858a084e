"""Evaluation protocols and classical baselines, shared by benchmarks/ and training reports.

Next location: on held-out sequences of tokens, predict every next token from its prefix (teacher forcing);
report Acc@1/5/10 and MRR over the full vocabulary. Baselines: popularity, first- and second-order Markov
chains with interpolated (Jelinek-Mercer) smoothing, weights chosen on the validation split.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from pgtraj.core.features import collate, to_inputs
from pgtraj.core.tokenizer import MASK, SPECIAL_TOKENS, Tokens, move_frames
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
            logits = model.lm_head(model.next_step(**b)[0])
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
# Next step in the user's terms: after a prefix that ends at an observed fix, rank the true next cell at
# the tokenizer's resolution (a coarse fallback token names no cell, so it counts as a miss), whatever the
# vocabulary knows. Every method ranks cells; a cell it cannot name has rank infinity.

# slots of a move frame by their angle from straight on (right before left at equal angles)
STRAIGHT_ON_ORDER = np.array([0, 1, 5, 2, 4, 3])


@dataclass
class StepCases:
    """The judged next steps of a list of tokenized trajectories: trajectory index, token index i (the
    prefix is tokens 0..i, i >= 1 so that the last move is known), the true next cell and the move frame
    of token i."""

    traj: np.ndarray
    index: np.ndarray
    current: np.ndarray    # uint64 (n,): where the prefix ends
    truth: np.ndarray      # uint64 (n,)
    frames: np.ndarray     # uint64 (n, 6)

    @classmethod
    def of(cls, encoded: list[Tokens], max_len: int) -> "StepCases":
        parts = []
        for k, x in enumerate(encoded):
            n = min(len(x), max_len - 1)
            i = np.arange(1, n - 1)
            i = i[~x.interpolated[i]]
            if len(i):
                parts.append((np.full(len(i), k), i, x.cells[i], x.cells[i + 1], move_frames(x.cells[:n])[i]))
        if not parts:
            raise ValueError("no next steps to judge")
        return cls(*(np.concatenate(c) for c in zip(*parts)))

    def __len__(self) -> int:
        return len(self.index)

    def frame_ranks(self, scores: np.ndarray) -> np.ndarray:
        """Ranks of the true cells given scores (n, 6) of each frame's cells (-inf: not named); pessimistic
        ties; infinity when the true cell is not in the frame."""
        hit = self.frames == self.truth[:, None]
        own = np.where(hit, scores, -np.inf).max(axis=1)
        ranks = (scores >= own[:, None]).sum(axis=1).astype(np.float64)
        ranks[~hit.any(axis=1) | ~np.isfinite(own)] = np.inf
        return ranks


def step_metrics(ranks: np.ndarray, top1_error_m: np.ndarray | None = None) -> dict:
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {"acc@1": float(np.mean(ranks <= 1)), "acc@5": float(np.mean(ranks <= 5)),
           "mrr": float(np.mean(1.0 / ranks)), "n": int(len(ranks))}
    if top1_error_m is not None:
        out["top1_error_m_median"] = float(np.median(top1_error_m))
    return out


def straight_on_scores(cases: StepCases) -> np.ndarray:
    """The grid neighbour that continues the last move first, then the others by angle."""
    scores = np.empty((len(cases), 6))
    scores[:, STRAIGHT_ON_ORDER] = -np.arange(6, dtype=np.float64)
    return np.where(cases.frames == 0, -np.inf, scores)


class CellMarkov:
    """P(next cell | last k cells) = sum_j lambda_j P_j (j = 0: popularity), maximum-likelihood P_j, over
    true cells. ``backoff``: cells it gives the same probability (0 included: never seen after this
    context) are ordered by straight_on_scores, so unseen places fall back on the grid."""

    def __init__(self, order: int, lambdas: tuple[float, ...] | None = None, backoff: bool = True):
        self.order, self.backoff = order, backoff
        self.lambdas = lambdas or tuple([1.0 / (order + 1)] * (order + 1))
        self.counts = [defaultdict(Counter) for _ in range(order + 1)]

    def fit(self, encoded: list[Tokens]) -> "CellMarkov":
        for x in encoded:
            seq = x.cells.tolist()
            for i, nxt in enumerate(seq):
                for j in range(self.order + 1):
                    if i >= j:
                        self.counts[j][tuple(seq[i - j:i])][nxt] += 1
        self.totals = [{ctx: sum(c.values()) for ctx, c in level.items()} for level in self.counts]
        return self

    def _p(self, ctx: tuple, cell: int) -> float:
        p = 0.0
        for j in range(self.order + 1):
            if len(ctx) >= j:
                key = ctx[len(ctx) - j:]
                c = self.counts[j].get(key)
                if c:
                    p += self.lambdas[j] * c.get(cell, 0) / self.totals[j][key]
        return p

    def ranks(self, cases: StepCases, encoded: list[Tokens]) -> tuple[np.ndarray, np.ndarray]:
        """Ranks of the true cells, and each case's top-1 cell."""
        so = straight_on_scores(cases)
        out, top = np.empty(len(cases)), np.zeros(len(cases), np.uint64)
        for n, (k, i) in enumerate(zip(cases.traj.tolist(), cases.index.tolist())):
            cells = encoded[k].cells
            ctx = tuple(cells[max(0, i + 1 - self.order):i + 1].tolist())
            cand = set(cases.frames[n][cases.frames[n] != 0].tolist())
            for j in range(1, self.order + 1):  # every cell seen after this context can be named
                c = self.counts[j].get(ctx[len(ctx) - j:]) if len(ctx) >= j else None
                cand.update(c or ())
            cand = list(cand)
            p = np.array([self._p(ctx, c) for c in cand])
            if self.backoff:  # ties in probability broken by the grid; lambda_0 > 0 keeps probabilities apart
                slot = {c: s for s, c in enumerate(cases.frames[n].tolist())}
                p = p + 1e-9 * np.array([np.exp(so[n, slot[c]]) if c in slot else 0.0 for c in cand])
            truth = int(cases.truth[n])
            own = p[cand.index(truth)] if truth in cand else 0.0
            out[n] = np.inf if own <= 0 else float(np.sum(p >= own))
            top[n] = cand[int(np.argmax(p))] if len(cand) and p.max() > 0 else 0
        return out, top


def tune_cell_markov(order: int, train: list[Tokens], val: list[Tokens], max_len: int,
                     backoff: bool = True) -> CellMarkov:
    """The interpolation weights with the best validation MRR from a small grid."""
    grid = {1: [(0.01, 0.99), (0.05, 0.95), (0.2, 0.8)],
            2: [(0.01, 0.29, 0.7), (0.01, 0.49, 0.5), (0.02, 0.18, 0.8), (0.05, 0.35, 0.6)]}[order]
    mc = CellMarkov(order, backoff=backoff).fit(train)
    cases = StepCases.of(val, max_len)
    best = max(grid, key=lambda lam: (setattr(mc, "lambdas", lam), step_metrics(mc.ranks(cases, val)[0])["mrr"])[1])
    mc.lambdas = best
    return mc


class MoveMarkov:
    """P(next move | last k moves), counted on training trips: a place-free baseline (what motion alone
    predicts), backed off to shorter contexts and then to straight on."""

    def __init__(self, order: int):
        self.order = order
        self.counts = [defaultdict(Counter) for _ in range(order + 1)]

    def fit(self, encoded: list[Tokens]) -> "MoveMarkov":
        for x in encoded:
            m = x.move.tolist()
            for i in range(1, len(m)):
                for j in range(self.order + 1):
                    if i >= j:
                        self.counts[j][tuple(m[i - j:i])][m[i]] += 1
        return self

    def scores(self, cases: StepCases, encoded: list[Tokens]) -> np.ndarray:
        so = straight_on_scores(cases)
        out = np.empty((len(cases), 6))
        for n, (k, i) in enumerate(zip(cases.traj.tolist(), cases.index.tolist())):
            m = encoded[k].move.tolist()
            for j in range(self.order, -1, -1):  # the longest context seen
                c = self.counts[j].get(tuple(m[i + 1 - j:i + 1])) if i + 1 >= j else None
                if c:
                    break
            total = sum(c.values()) if c else 1
            out[n] = [(c.get(s, 0) / total if c else 0.0) for s in range(6)]
        return np.where(cases.frames == 0, -np.inf, out + 1e-9 * np.exp(so))


def model_step_scores(model: TrajectoryModel, tok, cases: StepCases, encoded: list[Tokens], *, how: str = "move",
                      batch_size: int = 32, max_len: int = 512) -> np.ndarray:
    """(n, 6) scores of each case's frame cells under the model. ``how``: "move" (the next-move head),
    "vocab" (the next-token head, constrained to the grid neighbours; a neighbour whose token is a coarse
    fallback or UNK cannot be named), "mix" (move logit + token logit of the neighbour's token)."""
    model.eval()
    out = np.full((len(cases), 6), -np.inf)
    by_traj = defaultdict(list)
    for n, k in enumerate(cases.traj.tolist()):
        by_traj[k].append(n)
    order = sorted(by_traj)
    frame_tokens = tok.lookup(cases.frames.reshape(-1)).reshape(-1, 6) if how != "move" else None
    for start in range(0, len(order), batch_size):
        ks = order[start:start + batch_size]
        b = to_tensors(collate([to_inputs(encoded[k]) for k in ks], max_len=max_len))
        with torch.no_grad():
            h, move_logits, _ = model.next_step(**b)
        for row, k in enumerate(ks):
            idx = np.array(by_traj[k])
            pos = cases.index[idx] + 1                              # input position of token i (BOS first)
            if how in ("move", "mix"):
                out[idx] = move_logits[row, pos, :6].numpy()
            if how in ("vocab", "mix"):
                ft = frame_tokens[idx]
                with torch.no_grad():
                    lv = model.lm_head(h[row, pos]).numpy()
                tl = np.take_along_axis(lv, ft, axis=1)
                if how == "vocab":
                    out[idx] = np.where(tok.names_exactly(ft, cases.frames[idx]), tl, -np.inf)
                else:
                    out[idx] += tl
    return np.where(cases.frames == 0, -np.inf, out)


def top1_error_m(cases: StepCases, top: np.ndarray) -> np.ndarray:
    """Metres from each case's top-1 cell to the true cell (centre to centre); a method that names
    nothing is scored as if it had said "where it is now"."""
    import h3.api.numpy_int as h3i

    from pgtraj.core.trajectory import haversine_m

    top = np.where(top == 0, cases.current, top)
    true = np.array([h3i.cell_to_latlng(int(c)) for c in cases.truth.tolist()])
    pred = np.array([h3i.cell_to_latlng(int(c)) for c in top.tolist()])
    return haversine_m(true[:, 0], true[:, 1], pred[:, 0], pred[:, 1])


def frame_top1(cases: StepCases, scores: np.ndarray) -> np.ndarray:
    """The top-1 cell of frame scores; 0 where a method names none of them (every score -inf)."""
    top = cases.frames[np.arange(len(cases)), scores.argmax(axis=1)]
    return np.where(np.isfinite(scores.max(axis=1)), top, 0).astype(np.uint64)


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


def gap_recovery(model: TrajectoryModel, tok, encoded: list[Tokens], *, spans: tuple[int, int] = (3, 20),
                 per_trip: int = 3, seed: int = 0, max_len: int = 512, sigma_m: float | None = 250.0) -> dict:
    """Hide gaps of ``spans`` consecutive cells (up to ``per_trip`` a trip, each between two seen cells, on a
    contiguous stretch: no jump, no cell the tokenizer itself interpolated), recover them, and measure the
    metres from each recovered position to the true cell's centre, and to the mean of the true fixes in
    that cell. Methods on the same gaps: the model's expected place at each position over the contiguous
    paths between the gap's ends (core.gaps.expected_positions: what fill_gaps serves), the likeliest such
    path (core.gaps.best_path), its per-position argmax over all cells, and linear interpolation in time
    between the cells around the gap."""
    import h3.api.numpy_int as h3i

    from pgtraj.core.gaps import best_path, expected_positions
    from pgtraj.core.tokenizer import JUMP
    from pgtraj.core.trajectory import M_PER_DEG, haversine_m
    from pgtraj.learn.tasks.masked_spans import MaskedSpans

    model.eval()
    masker, rng = MaskedSpans(model), np.random.default_rng(seed)
    edge = h3i.average_hexagon_edge_length(tok.config.resolution, unit="m")
    methods = ("expected", "path", "argmax", "linear")
    err = {m: {"cell": [], "fixes": []} for m in methods}
    exact = {m: [] for m in methods}
    gaps = 0
    for x in encoded:
        n = min(len(x), max_len - 2)
        ok = (x.move[:n] != JUMP) & ~x.interpolated[:n]
        hidden = np.zeros(n, bool)
        chosen = []
        for _ in range(4 * per_trip):
            if len(chosen) == per_trip or n < spans[0] + 2:
                break
            length = int(rng.integers(spans[0], min(spans[1], n - 2) + 1))
            start = int(rng.integers(1, n - length))  # x[start - 1] and x[start + length] stay seen
            if ok[start:start + length + 1].all() and not hidden[start - 1:start + length + 1].any():
                hidden[start:start + length] = True
                chosen.append((start, length))
        if not chosen:
            continue
        b = to_tensors(collate([to_inputs(x)], max_len=max_len))
        masked = torch.zeros_like(b["tokens"], dtype=torch.bool)
        masked[0, 1:n + 1] = torch.from_numpy(hidden)  # +1: BOS
        with torch.no_grad():
            logits = masker.masked_logits(torch.where(masked, torch.full_like(b["tokens"], MASK), b["tokens"]),
                                          b, masked)
        logp = torch.log_softmax(logits, -1).numpy()  # as the masked_logp graph gives them to fill_gaps
        logits[:, : len(SPECIAL_TOKENS)] = -torch.inf  # an argmax names a place
        rows = {i: r for r, i in enumerate(np.flatnonzero(hidden))}
        seen = np.flatnonzero(~hidden)
        seen_ll = np.array([h3i.cell_to_latlng(int(c)) for c in x.cells[seen]])
        for start, length in chosen:
            gaps += 1
            idx = np.arange(start, start + length)
            centre = np.array([h3i.cell_to_latlng(int(c)) for c in x.cells[idx]])
            # the fixes' mean position: the cell centre plus the tokenizer's offset (east, north in edge lengths)
            fixes = centre + np.stack([x.offset[idx, 1], x.offset[idx, 0] / np.cos(np.radians(centre[:, 0]))],
                                      axis=1) * edge / M_PER_DEG
            lp = logp[[rows[i] for i in idx]]
            a, z = int(x.cells[start - 1]), int(x.cells[start + length])
            lin = np.stack([np.interp(x.t[idx], x.t[seen], seen_ll[:, 0]),
                            np.interp(x.t[idx], x.t[seen], seen_ll[:, 1])], axis=1)
            path = best_path(a, z, length + 1, tok.lookup, lp, sigma_m=sigma_m)
            found = expected_positions(a, z, length + 1, tok.lookup, lp, sigma_m=sigma_m)
            arg_tokens = logits[[rows[i] for i in idx]].argmax(-1).numpy()
            pred = {"expected": lin if found is None else found[0],
                    "path": lin if path is None else np.array([h3i.cell_to_latlng(int(c)) for c in path]),
                    "argmax": cell_centres(tok, arg_tokens), "linear": lin}
            for name, at in pred.items():
                for truth, where in (("cell", centre), ("fixes", fixes)):
                    err[name][truth].extend(haversine_m(where[:, 0], where[:, 1], at[:, 0], at[:, 1]).tolist())
                if name == "argmax":
                    exact[name].extend(tok.names_exactly(arg_tokens, x.cells[idx]).tolist())
                else:
                    exact[name].extend([h3i.latlng_to_cell(la, lo, tok.config.resolution) == c
                                        for (la, lo), c in zip(at, x.cells[idx].tolist())])
    out = {"gaps": gaps, "hidden_cells": len(err["linear"]["cell"]), "spans": list(spans)}
    for name in methods:
        out[name] = {}
        for truth, e in err[name].items():
            e = np.array(e)
            key = "" if truth == "cell" else "fixes_"
            out[name].update({f"{key}median_m": float(np.median(e)), f"{key}mean_m": float(e.mean()),
                              f"{key}p90_m": float(np.quantile(e, 0.9))})
        out[name]["exact_cell"] = float(np.mean(exact[name]))
    for name in ("expected", "path"):
        out[f"{name}_vs_linear_median"] = out[name]["median_m"] / max(out["linear"]["median_m"], 1e-9) - 1
    return out


def perplexity(model: TrajectoryModel, encoded: list[Tokens], *, batch_size: int = 32, max_len: int = 512) -> float:
    """exp(mean negative log-likelihood) of every next token (same positions as model_ranks)."""
    model.eval()
    nll, n = 0.0, 0
    for chunk, b in in_batches(encoded, batch_size, max_len):
        with torch.no_grad():
            logp = torch.log_softmax(model.lm_head(model.next_step(**b)[0]), dim=-1)
        for row, x in enumerate(chunk):
            k = min(len(x.tokens), max_len - 1)
            tgt = torch.from_numpy(x.tokens[1:k].astype(np.int64))
            nll -= float(logp[row, 1:k].gather(1, tgt[:, None]).sum())
            n += len(tgt)
    return float(np.exp(nll / max(n, 1)))
