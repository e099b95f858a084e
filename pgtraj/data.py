"""Batches for training: cleaned trajectories -> tokens -> padded tensors, plus the augmentations that make
contrastive views (downsampling, cropping, distortion), applied to the raw fixes before tokenizing."""

from __future__ import annotations

import numpy as np
import torch

from .features import Inputs, collate, to_inputs
from .tokenizer import Tokenizer
from .trajectory import EARTH_RADIUS_M, Trajectory

_M_PER_DEG = np.pi / 180.0 * EARTH_RADIUS_M


def augment(tr: Trajectory, rng: np.random.Generator, *, keep: tuple = (0.5, 0.9), crop: tuple = (0.7, 1.0),
            noise_m: float = 30.0) -> Trajectory:
    """A random view of the same trip: a contiguous crop, a random subset of its fixes, positions jittered."""
    n = len(tr)
    length = max(2, int(n * rng.uniform(*crop)))
    start = int(rng.integers(0, n - length + 1))
    tr = tr.take(slice(start, start + length))
    mask = rng.random(len(tr)) < rng.uniform(*keep)
    mask[[0, -1]] = True
    tr = tr.take(mask)
    dlat = rng.normal(0, noise_m, len(tr)) / _M_PER_DEG
    dlon = rng.normal(0, noise_m, len(tr)) / (_M_PER_DEG * np.cos(np.radians(tr.lat)))
    return Trajectory(tr.id, tr.t, tr.lat + dlat, tr.lon + dlon, tr.part)


def to_tensors(b: Inputs, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(getattr(b, k)).to(device) for k in ("tokens", "dow", "minute", "cont")}


class Batches:
    """Random batches of (windows of) trajectories, tokenized on the fly. Deterministic for a seed."""

    def __init__(self, trajectories: list[Trajectory], tokenizer: Tokenizer, *, batch_size: int, max_len: int,
                 seed: int = 0, device: str = "cpu"):
        if not trajectories:
            raise ValueError("no trajectories to train on")
        self.trajs, self.tok, self.batch_size, self.max_len = trajectories, tokenizer, batch_size, max_len
        self.rng = np.random.default_rng(seed)
        self.device = device

    def _window(self, inp: Inputs) -> Inputs:
        n = len(inp.tokens)
        if n <= self.max_len:
            return inp
        s = int(self.rng.integers(0, n - self.max_len + 1))
        return Inputs(inp.tokens[s:s + self.max_len], inp.dow[s:s + self.max_len], inp.minute[s:s + self.max_len],
                      inp.cont[s:s + self.max_len])

    def sample(self) -> list[Trajectory]:
        return [self.trajs[i] for i in self.rng.integers(0, len(self.trajs), self.batch_size)]

    def encode(self, trajs: list[Trajectory]) -> dict[str, torch.Tensor]:
        return to_tensors(collate([self._window(to_inputs(self.tok.encode(t))) for t in trajs]), self.device)

    def next(self) -> dict[str, torch.Tensor]:
        return self.encode(self.sample())

    def views(self) -> tuple[dict, dict]:
        """Two augmented views of the same batch of trips (contrastive objectives)."""
        trajs = self.sample()
        return (self.encode([augment(t, self.rng) for t in trajs]),
                self.encode([augment(t, self.rng) for t in trajs]))
