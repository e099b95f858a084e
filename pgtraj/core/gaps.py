"""Filling a gap between two known cells from a model's beliefs, over the contiguous paths on the H3 grid.

A gap of ``steps`` moves from cell ``a`` to cell ``b`` (each move to a grid neighbour, as the tokenizer's
tokens are) can only pass through cells within ``j`` moves of ``a`` and ``steps - j`` moves of ``b`` at
its ``j``-th hidden position. Each such path is weighed by a model: the masked-span head gives, at each
hidden position, log-probabilities over the vocabulary; a token that stands for several candidate cells (a
coarse ancestor, UNK) shares its probability equally among them; and a Gaussian pull towards the straight
line bounds how far the model's belief may take the path. So the straight line is what comes out where the
model knows nothing, and a road's bend where it does, and every path ends where the trip is seen again,
which the model's per-position argmax does not.

Two answers from the same weights: ``best_path``, the single likeliest path (Viterbi: contiguous cells), and
``expected_positions``, each position's expected place over all the paths (forward-backward), which is
what pgtraj.fill_gaps serves (runtime/tasks/masked.py, from a masked_logp graph): where the model hesitates
between two neighbouring cells or roads, a point between them is nearer the truth, in metres, than either
cell. Both are measured by learn.evaluation.gap_recovery (benchmarks/gaps.py) with the same code.
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


def _lattice(a: int, b: int, steps: int, tokens_of, logp: np.ndarray, sigma_m: float | None):
    """(candidate cells, their scores, links) of every hidden position of a path a -> b in ``steps`` moves:
    ``links[j][i]`` are the indices in cands[j] of the neighbours of cands[j + 1][i]. None where no path is
    searched."""
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
    scores[0][~np.array([h3i.are_neighbor_cells(a, int(c)) for c in cands[0]])] = -np.inf
    scores[-1][~np.array([h3i.are_neighbor_cells(int(c), b) for c in cands[-1]])] = -np.inf
    links = []
    for j in range(1, len(cands)):
        index = {int(c): i for i, c in enumerate(cands[j - 1])}
        links.append([np.array([index[int(n)] for n in h3i.grid_ring(int(c), 1) if int(n) in index], dtype=int)
                      for c in cands[j]])
    return cands, scores, links


def best_path(a: int, b: int, steps: int, tokens_of, logp: np.ndarray, *,
              sigma_m: float | None = SIGMA_M) -> np.ndarray | None:
    """The cells (steps - 1 of them) of the most likely path a -> b in ``steps`` moves. ``tokens_of(cells)``
    gives each cell's vocabulary token (Tokenizer.lookup); ``logp`` (steps - 1, V) the model's
    log-probabilities at each hidden position. Each position is also pulled towards where it would be on
    the straight line from a's centre to b's at even steps, as a Gaussian of ``sigma_m`` metres (None: no
    pull): how far from the line the model's belief may take the path. None when there is no such path or
    it is too long to search."""
    lattice = _lattice(a, b, steps, tokens_of, logp, sigma_m)
    if lattice is None:
        return None
    cands, scores, links = lattice
    # Viterbi over positions: best[i] = best score of a path reaching cands[j][i]
    best, back = scores[0].copy(), []
    for j in range(1, len(cands)):
        prev = np.array([k[np.argmax(best[k])] if len(k) else -1 for k in links[j - 1]])
        reach = np.array([best[k].max() if len(k) else -np.inf for k in links[j - 1]])
        back.append(prev)
        best = reach + scores[j]
    if not np.isfinite(best).any():
        return None
    path = [int(np.argmax(best))]
    for prev in reversed(back):
        path.append(int(prev[path[-1]]))
    path.reverse()
    return np.array([cands[j][i] for j, i in enumerate(path)], dtype=np.uint64)


def path_posterior(a: int, b: int, steps: int, tokens_of, logp: np.ndarray, *,
                   sigma_m: float | None = SIGMA_M) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Per hidden position, (candidate cells, probability of each) over every path a -> b in ``steps``
    moves, weighted as best_path weighs them (forward-backward); None where best_path would be."""
    lattice = _lattice(a, b, steps, tokens_of, logp, sigma_m)
    if lattice is None:
        return None
    cands, scores, links = lattice

    def lse(v: np.ndarray) -> float:
        m = v.max() if len(v) else -np.inf
        return m + np.log(np.exp(v - m).sum()) if np.isfinite(m) else -np.inf

    fwd = [scores[0]]
    for j in range(1, len(cands)):
        fwd.append(np.array([lse(fwd[-1][k]) for k in links[j - 1]]) + scores[j])
    if not np.isfinite(fwd[-1]).any():
        return None
    bwd = [np.zeros(len(cands[-1]))]
    for j in range(len(cands) - 1, 0, -1):  # bwd for position j - 1 from position j
        into = bwd[0] + scores[j]
        out = np.full(len(cands[j - 1]), -np.inf)
        for i, k in enumerate(links[j - 1]):
            out[k] = np.logaddexp(out[k], into[i])
        bwd.insert(0, out)
    post = []
    for cells, f, g in zip(cands, fwd, bwd):
        w = f + g
        w = np.exp(w - w.max())
        post.append((cells, w / w.sum()))
    return post


def expected_positions(a: int, b: int, steps: int, tokens_of, logp: np.ndarray, *,
                       sigma_m: float | None = SIGMA_M) -> tuple[np.ndarray, np.ndarray] | None:
    """Per hidden position of a path a -> b in ``steps`` moves (weighed as best_path weighs them): the
    expected (lat, lon), and the probability that the trip was in the cell that point lies in (low where
    the point is a compromise between places the model hesitates between). None where best_path would be."""
    post = path_posterior(a, b, steps, tokens_of, logp, sigma_m=sigma_m)
    if post is None:
        return None
    res = h3i.get_resolution(a)
    points, probs = [], []
    for cells, w in post:
        ll = np.array([h3i.cell_to_latlng(int(c)) for c in cells])
        dlon = (ll[:, 1] - ll[0, 1] + 180.0) % 360.0 - 180.0  # a gap across the antimeridian stays short
        lat, lon = float(w @ ll[:, 0]), float((ll[0, 1] + w @ dlon + 180.0) % 360.0 - 180.0)
        points.append((lat, lon))
        probs.append(float(w[cells == np.uint64(h3i.latlng_to_cell(lat, lon, res))].sum()))
    return np.array(points), np.array(probs)
