"""What a trajectory embedding compares: its route (where it goes, whatever the day: the encoder graph's
output, which never sees absolute time), or its route and when it happened ("spacetime": the same place at
the same time, e.g. vehicles travelling together).

A spacetime vector is the route vector and a code of the trip's first and last timestamps, each part unit
length and weighted so that the whole is unit length:

    cosine(a, b) = (1 - TIME_WEIGHT) * cosine of the routes + TIME_WEIGHT * time agreement,

where the time agreement is the mean of cos(2 pi dt / P) over periods P from an hour to years and over
both ends: 1 when the trips start and end at the same moments, falling within hours, near 0 for trips
months apart. The periods grow by e^1.5, so that no whole number of days or weeks lines them all up again.
numpy only: the runtime and the benchmarks compute it with the same code.
"""

from __future__ import annotations

import numpy as np

ASPECTS = ("route", "spacetime")
TIME_PERIODS_S = 3600.0 * np.exp(1.5 * np.arange(8))  # 1 h, 4.5 h, 20 h, 3.7 d, 17 d, 75 d, 338 d, 4.1 y
TIME_CODE_DIM = 2 * 2 * len(TIME_PERIODS_S)           # cos and sin, start and end
TIME_WEIGHT = 0.5


def dimension(embedding_dim: int, aspect: str) -> int:
    """The width of a model's vectors of ``aspect``."""
    return embedding_dim + (TIME_CODE_DIM if aspect == "spacetime" else 0)


def time_code(t_start: np.ndarray, t_end: np.ndarray) -> np.ndarray:
    """(n, TIME_CODE_DIM) unit vectors of first and last epoch seconds: their dot product is the time
    agreement above."""
    out = []
    for t in (np.asarray(t_start, np.float64), np.asarray(t_end, np.float64)):
        phase = 2 * np.pi * np.mod(t[:, None], TIME_PERIODS_S) / TIME_PERIODS_S  # mod first: exact at epoch scale
        out += [np.cos(phase), np.sin(phase)]
    return (np.concatenate(out, axis=1) / np.sqrt(2 * len(TIME_PERIODS_S))).astype(np.float32)


def spacetime(route: np.ndarray, t_start: np.ndarray, t_end: np.ndarray) -> np.ndarray:
    """(n, dim + TIME_CODE_DIM) unit vectors from unit route vectors (n, dim) and the trips' first and last
    epoch seconds."""
    return np.concatenate([np.sqrt(1 - TIME_WEIGHT) * np.asarray(route, np.float32),
                           np.sqrt(TIME_WEIGHT) * time_code(t_start, t_end)], axis=1).astype(np.float32)
