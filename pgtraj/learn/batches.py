"""Batches for training: cleaned trajectories -> tokens -> padded tensors, plus the augmentations that make
contrastive views (splitting, downsampling, cropping, distortion), applied to the raw fixes before tokenizing."""

from __future__ import annotations

import numpy as np
import torch

from pgtraj.core.contract import INPUT_NAMES
from pgtraj.core.features import Inputs, collate, to_inputs
from pgtraj.core.tokenizer import SPECIAL_TOKENS, UNK, Tokenizer
from pgtraj.core.trajectory import M_PER_DEG, Trajectory


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
                 tail: bool = False, hide_cells: float = 0.0, pairs: int | None = None):
        if not trajectories:
            raise ValueError("no trajectories to train on")
        if labels is not None and len(labels) != len(trajectories):
            raise ValueError(f"{len(labels)} labels for {len(trajectories)} trajectories")
        self.trajs, self.tok, self.batch_size, self.max_len = trajectories, tokenizer, batch_size, max_len
        self.rng = np.random.default_rng(seed)
        self.device, self.pool, self.labels, self.tail, self.hide_cells = device, pool, labels, tail, hide_cells
        self.pairs = pairs or batch_size
        self._encoded: dict[int, Inputs] = {}   # tokenizing is deterministic: once per trajectory
        self._entered: dict[int, np.ndarray] = {}  # when each of its tokens' cells was entered (epoch s)
        self._pending: list[list[tuple[int, int]]] = []  # (trajectory index, window start) per queued batch

    def _inputs(self, i: int) -> Inputs:
        if i not in self._encoded:
            enc = self.tok.encode(self.trajs[i])
            self._encoded[i], self._entered[i] = to_inputs(enc), enc.t
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
        a, b = [], []
        for i in self.rng.integers(0, len(self.trajs), self.pairs).tolist():
            a_view, b_view = twin_views(self._stretch(i), self.rng)
            a.append(a_view)
            b.append(b_view)
        hidden = self._hidden(len(a))
        return self.encode(a, hidden), self.encode(b, hidden)

    def _stretch(self, i: int) -> Trajectory:
        self._inputs(i)
        tr, entered = self.trajs[i], self._entered[i]
        n = len(entered)
        length = int(self.rng.integers(min(16, n), min(n, self.max_len) + 1))
        if length >= n:
            return tr
        start = int(self.rng.integers(0, n - length + 1))
        keep = (tr.t >= entered[start]) & ((tr.t < entered[start + length]) if start + length < n else True)
        return tr.take(keep) if keep.sum() >= 2 else tr

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
