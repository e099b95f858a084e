"""Deterministic synthetic trips for unit tests only (never used to report model quality): vehicles drive
along a square grid road network at realistic speeds, leaving at rush-hour-heavy times of day, sampled
every few seconds with GPS noise."""

from __future__ import annotations

import numpy as np

from pgtraj.core.trajectory import M_PER_DEG, Trajectory


def grid_trips(n: int, *, seed: int = 0, origin=(39.90, 116.30), blocks: int = 20, block_m: float = 250.0,
               sample_s: float = 3.0, noise_m: float = 4.0, day0: float = 1_224_720_000.0) -> list[Trajectory]:
    """``n`` trips between random intersections of a ``blocks`` x ``blocks`` grid (Manhattan routes)."""
    rng = np.random.default_rng(seed)
    lat0, lon0 = origin
    m_per_deg_lon = M_PER_DEG * np.cos(np.radians(lat0))
    trips = []
    for i in range(n):
        a, b = rng.integers(0, blocks + 1, size=2), rng.integers(0, blocks + 1, size=2)
        while (a == b).all():
            b = rng.integers(0, blocks + 1, size=2)
        corner = np.array([b[0], a[1]]) if rng.random() < 0.5 else np.array([a[0], b[1]])
        route = np.array([a, corner, b], dtype=float) * block_m  # x east, y north, metres
        seg = np.linalg.norm(np.diff(route, axis=0), axis=1)
        cum = np.concatenate([[0.0], np.cumsum(seg)])
        speed = rng.uniform(6.0, 14.0)  # 22-50 km/h in town
        s = np.arange(0.0, cum[-1], speed * sample_s)
        x, y = np.interp(s, cum, route[:, 0]), np.interp(s, cum, route[:, 1])
        x, y = x + rng.normal(0, noise_m, len(s)), y + rng.normal(0, noise_m, len(s))
        hour = rng.choice([7.5, 8.5, 12.5, 17.5, 18.5, rng.uniform(0, 24)])
        start = day0 + 86400.0 * rng.integers(0, 28) + 3600.0 * hour + rng.uniform(0, 1800)
        trips.append(Trajectory(i, start + s / speed, lat0 + y / M_PER_DEG, lon0 + x / m_per_deg_lon))
    return trips
