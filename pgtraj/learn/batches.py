"""Batches for training: cleaned trajectories -> tokens -> padded tensors, plus the augmentations that make
contrastive views (splitting, downsampling, cropping, distortion), applied to the raw fixes before tokenizing."""

from __future__ import annotations

import numpy as np
import torch

from pgtraj.core.contract import INPUT_NAMES
from pgtraj.core.features import Inputs, collate, to_inputs
from pgtraj.core.tokenizer import SPECIAL_TOKENS, UNK, Tokenizer, cell_latlng, cell_parents
from pgtraj.core.trajectory import M_PER_DEG, Trajectory, haversine_m

HARD_GROUP = 4        # a stretch and up to three others from the same area that end nearest where it ends
HARD_CANDIDATES = 16  # stretches through the area weighed for each group
AREA_RESOLUTION = 8   # "the same area": the H3 cell (~0.7 km²) where a stretch starts


def jitter(tr: Trajectory, rng: np.random.Generator, noise_m: float) -> Trajectory:
    dlat = rng.normal(0, noise_m, len(tr)) / M_PER_DEG
    dlon = rng.normal(0, noise_m, len(tr)) / (M_PER_DEG * np.cos(np.radians(tr.lat)))
    return Trajectory(tr.id, tr.t, tr.lat + dlat, tr.lon + dlon, tr.part)


def twin_views(tr: Trajectory, rng: np.random.Generator, *, keep: tuple = (0.6, 1.0), crop: tuple = (0.9, 1.0),
               noise_m: float = 15.0) -> tuple[Trajectory, Trajectory]:
    """Two views of one stretch of road that share no fix: each fix goes to one view at random (as a trip
    recorded twice at half the rate, the t2vec/TrajCL odd/even protocol), then each view loses a few fixes
    and a little of its ends, and is jittered. What tells them apart from other trips is then where they go,
    not which fixes they share."""
    side = rng.random(len(tr)) < 0.5
    side[0], side[-1] = True, False  # both views reach both ends
    out = []
    for mask in (side, ~side):
        v = tr.take(mask)
        if len(v) > 4:
            length = max(2, int(len(v) * rng.uniform(*crop)))
            start = int(rng.integers(0, len(v) - length + 1))
            v = v.take(slice(start, start + length))
            sub = rng.random(len(v)) < rng.uniform(*keep)
            sub[[0, -1]] = True
            v = v.take(sub)
        out.append(jitter(v, rng, noise_m))
    return out[0], out[1]


def to_tensors(b: Inputs, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(getattr(b, k)).to(device) for k in INPUT_NAMES}


def in_batches(encoded: list, batch_size: int, max_len: int | None = None):
    """(chunk, padded input tensors) over tokenized trajectories in order: how every evaluation runs a model
    over a list (call it under torch.no_grad(), with the model in eval mode)."""
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        yield chunk, to_tensors(collate([to_inputs(x) for x in chunk], max_len=max_len))


class Batches:
    """Random batches of (windows of) trajectories, tokenized on the fly. Deterministic for a seed.

    Batches for next()/masked objectives are length-grouped: ``pool`` batches' worth of windows are drawn at
    once, sorted by length, cut into batches and served in random order. Every window is still drawn
    uniformly; what changes is who shares a batch, so padding drops (GeoLife: ~22% of a random batch is
    real tokens, ~90% of a grouped one). ``state()``/``restore()`` carry the pending pool across a resume.

    ``labels`` (one int per trajectory) add a "label" tensor to next() batches; with ``tail`` a long trip's
    window is its last ``max_len`` tokens (destination: the target is the end).

    ``hide_cells``: the share of sequences whose cell tokens all read UNK (their "cells_hidden" entry is
    True), as in a place the vocabulary does not know: the model learns to go by moves, time and motion
    alone there, which is what carries over to new places."""

    def __init__(self, trajectories: list[Trajectory], tokenizer: Tokenizer, *, batch_size: int, max_len: int,
                 seed: int = 0, device: str = "cpu", pool: int = 16, labels: list[int] | None = None,
                 tail: bool = False, hide_cells: float = 0.0, pairs: int | None = None,
                 hard_negatives: float = 0.0):
        if not trajectories:
            raise ValueError("no trajectories to train on")
        if labels is not None and len(labels) != len(trajectories):
            raise ValueError(f"{len(labels)} labels for {len(trajectories)} trajectories")
        self.trajs, self.tok, self.batch_size, self.max_len = trajectories, tokenizer, batch_size, max_len
        self.rng = np.random.default_rng(seed)
        self.device, self.pool, self.labels, self.tail, self.hide_cells = device, pool, labels, tail, hide_cells
        self.pairs, self.hard_negatives = pairs or batch_size, hard_negatives
        self._encoded: dict[int, Inputs] = {}   # tokenizing is deterministic: once per trajectory
        self._entered: dict[int, np.ndarray] = {}  # when each of its tokens' cells was entered (epoch s)
        self._cells: dict[int, np.ndarray] = {}    # its tokens' cells
        self._areas: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (area, trajectory, token), sorted
        self._pending: list[list[tuple[int, int]]] = []  # (trajectory index, window start) per queued batch

    def _inputs(self, i: int) -> Inputs:
        if i not in self._encoded:
            enc = self.tok.encode(self.trajs[i])
            self._encoded[i], self._entered[i], self._cells[i] = to_inputs(enc), enc.t, enc.cells
        return self._encoded[i]

    def _start(self, inp: Inputs) -> int:
        n = len(inp.tokens)
        if n <= self.max_len:
            return 0
        return n - self.max_len if self.tail else int(self.rng.integers(0, n - self.max_len + 1))

    def _window(self, inp: Inputs, s: int) -> Inputs:
        return inp.window(s, s + self.max_len)

    def encode(self, trajs: list[Trajectory], hidden: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        wins = []
        for t in trajs:
            inp = to_inputs(self.tok.encode(t))
            wins.append(self._window(inp, self._start(inp)))
        return self._hide(to_tensors(collate(wins), self.device), hidden)

    def _hidden(self, n: int) -> np.ndarray:
        return self.rng.random(n) < self.hide_cells if self.hide_cells else np.zeros(n, bool)

    def _hide(self, batch: dict[str, torch.Tensor], hidden: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        hidden = torch.from_numpy(self._hidden(len(batch["tokens"])) if hidden is None else hidden).to(self.device)
        if self.hide_cells:
            cell = batch["tokens"] >= len(SPECIAL_TOKENS)
            batch["tokens"] = torch.where(cell & hidden[:, None], torch.full_like(batch["tokens"], UNK),
                                          batch["tokens"])
        batch["cells_hidden"] = hidden
        return batch

    def next(self) -> dict[str, torch.Tensor]:
        if not self._pending:
            idx = self.rng.integers(0, len(self.trajs), self.batch_size * self.pool).tolist()
            picks = [(i, self._start(self._inputs(i))) for i in idx]
            picks.sort(key=lambda p: min(len(self._inputs(p[0]).tokens) - p[1], self.max_len))
            batches = [picks[k:k + self.batch_size] for k in range(0, len(picks), self.batch_size)]
            self._pending = [batches[j] for j in self.rng.permutation(len(batches))]
        batch = self._pending.pop()
        out = self._hide(to_tensors(collate([self._window(self._inputs(i), s) for i, s in batch]), self.device))
        if self.labels is not None:
            out["label"] = torch.tensor([self.labels[i] for i, _ in batch], device=self.device)
        return out

    def views(self) -> tuple[dict, dict]:
        """Two views (twin_views) of a random stretch of each of a batch of trips: between 16 and ``max_len``
        tokens long, so that both views see the same stretch whole, whatever the trip's length. A pair's
        cells are hidden in both views or in neither (hide_cells): at search time a query and its twin come
        from the same place."""
        hard = int(self.pairs * self.hard_negatives)
        stretches: list[tuple[int, int, int]] = []
        while len(stretches) < hard:
            stretches += self._neighbours(self._pick(int(self.rng.integers(0, len(self.trajs)))))
        # a random pair's stretch is drawn right before its views: the order 0.3.0's base was trained in
        picks = stretches[:hard] + self.rng.integers(0, len(self.trajs), self.pairs - hard).tolist()
        a, b = [], []
        for pick in picks:
            a_view, b_view = twin_views(self._stretch(*(self._pick(pick) if isinstance(pick, int) else pick)),
                                        self.rng)
            a.append(a_view)
            b.append(b_view)
        hidden = self._hidden(len(a))
        return self.encode(a, hidden), self.encode(b, hidden)

    def _pick(self, i: int) -> tuple[int, int, int]:
        """(trajectory, first token, tokens) of a random stretch of trajectory i."""
        self._inputs(i)
        n = len(self._entered[i])
        length = int(self.rng.integers(min(16, n), min(n, self.max_len) + 1))
        if length >= n:
            return i, 0, n
        return i, int(self.rng.integers(0, n - length + 1)), length

    def _stretch(self, i: int, start: int, length: int) -> Trajectory:
        """The fixes of trajectory i in its tokens start .. start + length - 1."""
        tr, entered = self.trajs[i], self._entered[i]
        if start == 0 and length >= len(entered):
            return tr
        keep = (tr.t >= entered[start]) & ((tr.t < entered[start + length]) if start + length < len(entered)
                                           else True)
        return tr.take(keep) if keep.sum() >= 2 else tr

    def _area_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where every trajectory enters each area: (area, trajectory, token) sorted by area. Built once, on
        the first hard-negative batch (it tokenizes every trajectory)."""
        if self._areas is None:
            areas, trajs, tokens = [], [], []
            for i in range(len(self.trajs)):
                self._inputs(i)
                area = cell_parents(self._cells[i], AREA_RESOLUTION)
                enter = np.flatnonzero(np.r_[True, area[1:] != area[:-1]])
                areas.append(area[enter])
                trajs.append(np.full(len(enter), i, np.int32))
                tokens.append(enter.astype(np.int32))
            area, traj, token = np.concatenate(areas), np.concatenate(trajs), np.concatenate(tokens)
            order = np.argsort(area, kind="stable")
            self._areas = area[order], traj[order], token[order]
        return self._areas

    def _neighbours(self, anchor: tuple[int, int, int]) -> list[tuple[int, int, int]]:
        """The anchor stretch and up to HARD_GROUP - 1 stretches of other trajectories that start in its area
        with its length in tokens, those ending nearest its end first."""
        i, start, length = anchor
        areas, trajs, tokens = self._area_index()
        area = cell_parents(self._cells[i][start:start + 1], AREA_RESOLUTION)[0]
        lo, hi = np.searchsorted(areas, area), np.searchsorted(areas, area, side="right")
        others = np.flatnonzero(trajs[lo:hi] != i) + lo
        if not len(others):
            return [anchor]
        others = self.rng.choice(others, min(len(others), HARD_CANDIDATES), replace=False)
        cands = []
        for j, p in zip(trajs[others].tolist(), tokens[others].tolist()):
            n = min(length, len(self._cells[j]) - p)
            if n >= 2:
                cands.append((j, p, n))
        if not cands:
            return [anchor]
        ends = cell_latlng(np.array([self._cells[j][p + n - 1] for j, p, n in cands], np.uint64))
        here = cell_latlng(self._cells[i][start + length - 1:start + length])
        gap = haversine_m(ends[:, 0], ends[:, 1], here[0, 0], here[0, 1])
        group, seen = [anchor], {i}
        for k in np.argsort(gap, kind="stable").tolist():
            if cands[k][0] not in seen and len(group) < HARD_GROUP:
                group.append(cands[k])
                seen.add(cands[k][0])
        return group

    def resize(self, batch_size: int) -> None:
        """A new batch size from the next batch on (queued batches of the old size are dropped); the
        contrastive pairs shrink with it."""
        self.pairs = max(2, self.pairs * batch_size // self.batch_size)
        self.batch_size, self._pending = batch_size, []

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "pending": [list(map(list, b)) for b in self._pending]}

    def restore(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self._pending = [[tuple(p) for p in b] for b in state["pending"]]
