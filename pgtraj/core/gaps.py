"""Filling a gap between two known cells with the most likely contiguous path on the H3 grid.

A gap of ``steps`` moves from cell ``a`` to cell ``b`` (each move to a grid neighbour, as the tokenizer's
tokens are) can only pass through cells within ``j`` moves of ``a`` and ``steps - j`` moves of ``b`` at
its ``j``-th hidden position. Among those paths, Viterbi finds the one a model finds most likely: the
masked-span head gives, at each hidden position, log-probabilities over the vocabulary; a token that
stands for several candidate cells (a coarse ancestor, UNK) shares its probability equally among them. So
the straight grid line is what comes out where the model knows nothing, and a road's bend where it does;
the path always ends where the trip is seen again, which the model's per-position argmax does not.
Served by pgtraj.fill_gaps (runtime/tasks/masked.py, from a masked_logp graph) and measured by
learn.evaluation.gap_recovery (benchmarks/gaps.py) with the same code.
"""

from __future__ import annotations

import h3.api.numpy_int as h3i
import numpy as np

from pgtraj.core.trajectory import haversine_m

# the widest gap searched: candidates grow with the square of the gap (20 moves: < 1,300 cells a position)
MAX_STEPS = 32
# how far (metres, a Gaussian's sigma) a gap's path may stray from the straight line for the model's belief:
# chosen on the base model's validation users (benchmarks/gaps.py --tune)
SIGMA_M = 200.0


def candidates(a: int, b: int, steps: int) -> list[np.ndarray] | None:
    """The cells each hidden position 1 .. steps-1 of a path a -> b of ``steps`` moves can be in; None when
    no such path exists (b is more than ``steps`` moves away, or H3 finds no grid path)."""
    try:
        if h3i.grid_distance(a, b) > steps:
            return None
    except Exception:  # h3 raises its own error types where no grid path exists (pentagons, far cells)
        return None
    out = []
    for j in range(1, steps):
        near_a, near_b = h3i.grid_disk(a, j), h3i.grid_disk(b, steps - j)
        out.append(np.intersect1d(near_a, near_b).astype(np.uint64))
    return out


def best_path(a: int, b: int, steps: int, tokens_of, logp: np.ndarray, *,
              sigma_m: float | None = SIGMA_M) -> np.ndarray | None:
    """The cells (steps - 1 of them) of the most likely path a -> b in ``steps`` moves. ``tokens_of(cells)``
    gives each cell's vocabulary token (Tokenizer.lookup); ``logp`` (steps - 1, V) the model's
    log-probabilities at each hidden position. Each position is also pulled towards where it would be on
    the straight line from a's centre to b's at even steps, as a Gaussian of ``sigma_m`` metres (None: no
    pull): how far from the line the model's belief may take the path. None when there is no such path or
    it is too long to search."""
    if steps < 2 or steps > MAX_STEPS:
        return None
    cands = candidates(a, b, steps)
    if cands is None or any(len(c) == 0 for c in cands):
        return None
    ends = np.array([h3i.cell_to_latlng(a), h3i.cell_to_latlng(b)])
    line = ends[0] + np.outer(np.arange(1, steps) / steps, ends[1] - ends[0])
    scores = []
    for j, cells in enumerate(cands):
        tok = tokens_of(cells)
        _, inverse, counts = np.unique(tok, return_inverse=True, return_counts=True)
        score = logp[j, tok] - np.log(counts[inverse])  # a token's mass shared among its cells
        if sigma_m is not None:
            ll = np.array([h3i.cell_to_latlng(int(c)) for c in cells])
            score = score - 0.5 * (haversine_m(ll[:, 0], ll[:, 1], line[j, 0], line[j, 1]) / sigma_m) ** 2
        scores.append(score)
    # Viterbi over positions: best[j][i] = best score of a path reaching cands[j][i]
    best, back = scores[0].copy(), []
    reach_a = np.array([h3i.are_neighbor_cells(a, int(c)) for c in cands[0]])
    best[~reach_a] = -np.inf
    for j in range(1, len(cands)):
        index = {int(c): i for i, c in enumerate(cands[j - 1])}
        prev = np.full(len(cands[j]), -1)
        score = np.full(len(cands[j]), -np.inf)
        for i, c in enumerate(cands[j]):
            for n in h3i.grid_ring(int(c), 1):
                k = index.get(int(n))
                if k is not None and best[k] > score[i]:
                    score[i], prev[i] = best[k], k
        back.append(prev)
        best = score + scores[j]
    last = np.array([h3i.are_neighbor_cells(int(c), b) for c in cands[-1]])
    best[~last] = -np.inf
    if not np.isfinite(best).any():
        return None
    path = [int(np.argmax(best))]
    for prev in reversed(back):
        path.append(int(prev[path[-1]]))
    path.reverse()
    return np.array([cands[j][i] for j, i in enumerate(path)], dtype=np.uint64)
