"""Cleaning raw GPS trajectories before tokenizing. Each step is configurable and counted in a
CleaningReport, so what was removed is always visible (GeoLife has all of these problems: duplicate and
out-of-order timestamps inside a file, long gaps, GPS jumps, stationary stretches).

Order: time order -> speed spikes -> split on gaps and impossible jumps -> minimum length.
Stay points (Li et al., 2008; used by the seed paper "Towards a foundation model for trajectory
intelligence") are detected separately with ``stay_points``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pgtraj.core.trajectory import Trajectory, haversine_m

# Fastest plausible speed per transport mode, m/s (GeoLife's labels). Above it a fix is a GPS error.
MODE_MAX_SPEED_MPS = {
    "walk": 7.0, "run": 12.0, "bike": 20.0, "motorcycle": 60.0, "car": 60.0, "taxi": 60.0, "bus": 40.0,
    "subway": 40.0, "train": 100.0, "boat": 30.0, "airplane": 300.0,
}


@dataclass
class CleaningConfig:
    max_gap_s: float = 1200.0          # split where fixes are further apart in time (None: never)
    max_speed_mps: float = 100.0       # when the mode is unknown; fast trains are the limit on the ground
    mode_max_speed_mps: dict = field(default_factory=lambda: dict(MODE_MAX_SPEED_MPS))
    min_points: int = 5                # shorter pieces are dropped (and counted)
    min_duration_s: float = 60.0

    def speed_limit(self, mode: str | None) -> float:
        return self.mode_max_speed_mps.get(mode, self.max_speed_mps) if mode else self.max_speed_mps


@dataclass
class CleaningReport:
    counts: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        c = self.counts
        return (f"{c['trajectories_in']} trajectories ({c['points_in']} points) in -> {c['trajectories_out']} "
                f"({c['points_out']} points) out; removed: {c['duplicate_timestamps']} duplicate timestamps, "
                f"{c['out_of_order']} out-of-order fixes, {c['speed_outliers']} speed outliers; "
                f"{c['gap_splits']} splits on time gaps, {c['jump_splits']} on impossible jumps; dropped "
                f"{c['short_pieces']} pieces shorter than the minimum ({c['short_piece_points']} points)")


def clean(traj: Trajectory, config: CleaningConfig | None = None, report: CleaningReport | None = None,
          mode: str | None = None) -> list[Trajectory]:
    """Clean one trajectory; returns its usable pieces (``part`` numbers them)."""
    config = config or CleaningConfig()
    c = report.counts if report is not None else Counter()
    c["trajectories_in"] += 1
    c["points_in"] += len(traj)

    # 1. time order: keep a fix only if it is later than every fix kept before it
    prev_max = np.maximum.accumulate(np.concatenate([[-np.inf], traj.t[:-1]]))
    c["duplicate_timestamps"] += int(np.sum(traj.t == prev_max))
    c["out_of_order"] += int(np.sum(traj.t < prev_max))
    traj = traj.take(traj.t > prev_max)

    # 2. speed spikes: a fix reached too fast AND left too fast is a GPS jump (a few passes for runs of them)
    limit = config.speed_limit(mode)
    for _ in range(3):
        v = _speeds(traj)
        if len(v) == 0:
            break
        v_in, v_out = np.concatenate([[0.0], v]), np.concatenate([v, [0.0]])
        spike = (v_in > limit) & (v_out > limit)
        if len(traj) > 1:  # an end point is judged on its only neighbour
            spike[0] |= v[0] > limit and len(traj) > 2 and _speed(traj, 1, 2) <= limit
            spike[-1] |= v[-1] > limit and len(traj) > 2 and _speed(traj, -3, -2) <= limit
        if not spike.any():
            break
        c["speed_outliers"] += int(spike.sum())
        traj = traj.take(~spike)

    # 3. split where time stops (gaps) or space jumps (what spike removal could not explain)
    dt = np.diff(traj.t)
    gap = dt > config.max_gap_s if config.max_gap_s else np.zeros(len(dt), bool)
    jump = (_speeds(traj) > limit) & ~gap
    c["gap_splits"] += int(gap.sum())
    c["jump_splits"] += int(jump.sum())
    cuts = np.flatnonzero(gap | jump) + 1
    pieces = []
    for start, stop in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(traj)]])):
        piece = traj.take(slice(int(start), int(stop)))
        # 4. minimum length
        if len(piece) < config.min_points or piece.t[-1] - piece.t[0] < config.min_duration_s:
            c["short_pieces"] += 1
            c["short_piece_points"] += len(piece)
            continue
        piece.part = len(pieces)
        pieces.append(piece)
    c["trajectories_out"] += len(pieces)
    c["points_out"] += sum(len(p) for p in pieces)
    return pieces


def _speeds(traj: Trajectory) -> np.ndarray:
    d = haversine_m(traj.lat[:-1], traj.lon[:-1], traj.lat[1:], traj.lon[1:])
    return d / np.maximum(np.diff(traj.t), 1e-3)


def _speed(traj: Trajectory, i: int, j: int) -> float:
    d = haversine_m(traj.lat[i], traj.lon[i], traj.lat[j], traj.lon[j])
    return float(d / max(traj.t[j] - traj.t[i], 1e-3))


@dataclass(frozen=True)
class StayPoint:
    lat: float
    lon: float
    arrival: float
    departure: float
    first: int  # index range of the fixes that make it up
    last: int


def stay_points(traj: Trajectory, max_distance_m: float = 200.0, min_duration_s: float = 1200.0) -> list[StayPoint]:
    """Stay points (Li et al., 2008): a maximal run of fixes within ``max_distance_m`` of its first fix
    that lasts at least ``min_duration_s``."""
    out, i, n = [], 0, len(traj)
    while i < n - 1:
        j = i + 1  # becomes the first fix outside the radius (or n); looked for in chunks, not O(n) per i
        while j < n:
            stop = min(n, j + 256)
            far = np.flatnonzero(haversine_m(traj.lat[i], traj.lon[i], traj.lat[j:stop], traj.lon[j:stop])
                                 > max_distance_m)
            if len(far):
                j += int(far[0])
                break
            j = stop
        if traj.t[j - 1] - traj.t[i] >= min_duration_s:
            out.append(StayPoint(float(traj.lat[i:j].mean()), float(traj.lon[i:j].mean()),
                                 float(traj.t[i]), float(traj.t[j - 1]), i, j - 1))
            i = j
        else:
            i += 1
    return out
