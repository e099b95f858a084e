"""Cleaning raw GPS trajectories before tokenizing. Each step is configurable and counted in a
CleaningReport, so what was removed is always visible (GeoLife has all of these problems: duplicate and
out-of-order timestamps inside a file, long gaps, GPS jumps, stationary stretches).

Order: time order -> speed spikes -> split on gaps and impossible jumps -> minimum length.
Stay points (Li et al., 2008; used by the seed paper "Towards a foundation model for trajectory
intelligence") are detected separately with ``stay_points``.

What is plausible depends on what moves: ``CleaningOptions`` picks the thresholds of a domain profile (walk,
bike, car, person, vessel, aircraft, animal), explicit values, or, by default, the data's own quantiles
(``auto``); and a run that would discard more than ``max_discard`` of the fixes stops (``check_discard``)
rather than train a model of what happened to be left.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pgtraj.core.errors import ConfigError, PgtrajError
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


# per domain: (fastest plausible speed in m/s, longest pause inside one trip in s)
PROFILES = {
    "walk": (7.0, 600.0), "bike": (20.0, 900.0), "car": (60.0, 1200.0),
    "person": (100.0, 1200.0),   # any ground transport a person takes, walking to fast trains (GeoLife)
    "vessel": (30.0, 3600.0),    # ~58 knots; AIS reports thin out at sea
    "aircraft": (350.0, 1800.0),
    "animal": (40.0, 3600.0),    # birds in flight; tags sample sparsely to save battery
}
AUTO = "auto"


class CleaningError(PgtrajError, ValueError):
    """Cleaning would throw away too much of the data for a model of it to mean anything."""


@dataclass
class CleaningOptions:
    """How training cleans its data: a profile (or ``auto``: from the data), each threshold overridable, and
    the largest share of fixes it may discard before the run stops."""

    profile: str = AUTO
    max_speed_mps: float | None = None
    max_gap_s: float | None = None
    min_points: int = 5
    min_duration_s: float = 60.0
    max_discard: float = 0.2

    def __post_init__(self):
        if self.profile != AUTO and self.profile not in PROFILES:
            raise ConfigError(f"unknown cleaning profile {self.profile!r}", hint=f"one of {[AUTO, *PROFILES]}")
        for name in ("max_speed_mps", "max_gap_s"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ConfigError(f"cleaning {name} must be a positive number, not {value!r}")
        if isinstance(self.min_points, bool) or not isinstance(self.min_points, int) or self.min_points < 2:
            raise ConfigError(f"cleaning min_points must be an integer >= 2, not {self.min_points!r}")
        if not isinstance(self.min_duration_s, (int, float)) or self.min_duration_s < 0:
            raise ConfigError(f"cleaning min_duration_s must be a number >= 0, not {self.min_duration_s!r}")
        if isinstance(self.max_discard, bool) or not isinstance(self.max_discard, (int, float)) \
                or not 0 <= self.max_discard <= 1:
            raise ConfigError(f"cleaning max_discard must be a share from 0 to 1, not {self.max_discard!r}")

    def resolve(self, trajectories) -> tuple[CleaningConfig, str]:
        """The thresholds for these (raw) trajectories, and where they come from."""
        if self.profile == AUTO:
            speed, gap, why = _from_data(trajectories)
        else:
            (speed, gap), why = PROFILES[self.profile], f"profile {self.profile}"
        if self.max_speed_mps is not None:
            speed, why = float(self.max_speed_mps), why + ", max_speed_mps as given"
        if self.max_gap_s is not None:
            gap, why = float(self.max_gap_s), why + ", max_gap_s as given"
        config = CleaningConfig(max_gap_s=gap, max_speed_mps=speed, min_points=self.min_points,
                                min_duration_s=self.min_duration_s)
        return config, f"speed limit {speed:g} m/s, trips split at pauses over {gap:g} s ({why})"


def _from_data(trajectories) -> tuple[float, float, str]:
    """Thresholds from the data: 3x the fast end of how fast its trajectories go (the 99th percentile, over
    trajectories, of each one's 90th-percentile speed between fixes: GPS jumps, a few steps in a hundred,
    move neither), at least 10 m/s; a pause of 30 median sampling intervals, at least 10 minutes."""
    fast, gaps = [], []
    for tr in trajectories:
        if len(tr) > 1:
            dt = np.diff(tr.t)
            ok = dt > 0
            v = (haversine_m(tr.lat[:-1], tr.lon[:-1], tr.lat[1:], tr.lon[1:]) / np.maximum(dt, 1e-3))[ok]
            if len(v):
                fast.append(np.percentile(v, 90))
                gaps.append(dt[ok])
    if not fast:
        speed, gap = PROFILES["person"]
        return speed, gap, "auto: too few fixes to measure, so the person profile"
    p99, interval = float(np.percentile(fast, 99)), float(np.median(np.concatenate(gaps)))
    speed, gap = round(max(3 * p99, 10.0), 1), round(max(30 * interval, 600.0))
    return speed, gap, (f"auto: 3 x {p99:.1f} m/s, the 99th percentile of the trajectories' 90th-percentile speeds;"
                        f" 30 x the median interval {interval:g} s")


def check_discard(report: "CleaningReport", max_discard: float) -> float:
    """The share of fixes cleaning discarded; CleaningError when above ``max_discard``."""
    c = report.counts
    share = 1.0 - c["points_out"] / c["points_in"] if c["points_in"] else 0.0
    if share > max_discard:
        parts = {"speed outliers": c["speed_outliers"], "duplicate timestamps": c["duplicate_timestamps"],
                 "out-of-order fixes": c["out_of_order"], "pieces too short": c["short_piece_points"]}
        why = ", ".join(f"{k} {v / c['points_in']:.1%}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v)
        raise CleaningError(
            f"cleaning discarded {share:.1%} of the {c['points_in']:,} fixes ({why}), more than max_discard"
            f" {max_discard:.0%}: a model of what was left would not be a model of this data",
            hint="choose the data's profile (--profile vessel|aircraft|animal|..., cleaning.profile), set the"
                 " thresholds (--max-speed, --max-gap), or accept it (--allow-discard, cleaning.max_discard)")
    return share


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
