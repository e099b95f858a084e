"""A trajectory as three aligned numpy arrays, and the one wire format every source is read through.

Every source (PostGIS LINESTRING M/ZM, a point table, MobilityDB tgeompoint/tgeogpoint) is normalised in SQL
to WKB of a ``LINESTRING M`` in WGS84 whose M is epoch seconds, then parsed here with numpy. The same parser
runs in the client and inside PostgreSQL (this module imports numpy only).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from pgtraj.core.errors import TrajectoryError

EARTH_RADIUS_M = 6_371_008.8
M_PER_DEG = np.pi / 180.0 * EARTH_RADIUS_M  # metres per degree of latitude (of longitude at the equator)
# WKB geometry type codes of a line string with a measure: ISO (2002 M, 3002 ZM) and EWKB flag bits
_ISO_M, _ISO_ZM = 2002, 3002
_EWKB_Z, _EWKB_M, _EWKB_SRID = 0x80000000, 0x40000000, 0x20000000
# epoch seconds beyond this are in the year 5138: M is surely milliseconds (or microseconds)
_MAX_EPOCH_SECONDS = 1e11
# what a calendar can name (years 1 to 9999): time features are computed in local time from M
_EPOCH_RANGE = (-62135596800.0, 253402300799.0)
_WKB_TYPES = {1: "POINT", 2: "LINESTRING", 3: "POLYGON", 4: "MULTIPOINT", 5: "MULTILINESTRING", 6: "MULTIPOLYGON",
              7: "GEOMETRYCOLLECTION", 8: "CIRCULARSTRING", 9: "COMPOUNDCURVE", 10: "CURVEPOLYGON", 11: "MULTICURVE",
              12: "MULTISURFACE", 15: "POLYHEDRALSURFACE", 16: "TIN", 17: "TRIANGLE"}


@dataclass
class Trajectory:
    """Fixes of one moving object, in time order.

    ``t``: float64 epoch seconds, UTC (float32 would lose ~2 minutes at today's epoch values).
    ``lat``, ``lon``: float64 degrees, WGS84. ``z``: float64 altitude (the geometry's Z, metres by
    convention), or None when the source has none.
    """

    id: object
    t: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    part: int = 0  # index of the piece when cleaning split one source trajectory into several
    z: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.t)

    def take(self, index) -> "Trajectory":
        """The fixes selected by a slice, boolean mask or index array."""
        return Trajectory(self.id, self.t[index], self.lat[index], self.lon[index], self.part,
                          None if self.z is None else self.z[index])


def to_wkb(traj: Trajectory, srid: int | None = None) -> bytes:
    """ISO WKB of the trajectory as a LINESTRING M, or ZM with its altitude (x = lon, y = lat, M = epoch
    seconds): from_wkb's inverse. With ``srid``, EWKB carrying it (what COPY reads into a typed column)."""
    cols = [traj.lon, traj.lat] + ([] if traj.z is None else [traj.z]) + [traj.t]
    coords = np.stack(cols, axis=1).astype("<f8")
    if srid is None:
        head = struct.pack("<BII", 1, _ISO_M if traj.z is None else _ISO_ZM, len(traj))
    else:
        flags = _EWKB_M | _EWKB_SRID | (0 if traj.z is None else _EWKB_Z)
        head = struct.pack("<BIII", 1, 2 | flags, srid, len(traj))
    return head + coords.tobytes()


def from_wkb(traj_id, wkb: bytes | memoryview, time_scale: float = 1.0) -> Trajectory:
    """Parse WKB/EWKB of a LINESTRING M or ZM into a validated Trajectory; ``t = M * time_scale`` (use
    0.001 for M in milliseconds)."""
    buf = bytes(wkb)
    if len(buf) < 9:
        raise TrajectoryError(f"{_who(traj_id)}: geometry is empty or not WKB", traj_id=traj_id,
                              reason="not WKB")
    order = "<" if buf[0] == 1 else ">"
    (gtype,) = struct.unpack_from(order + "I", buf, 1)
    offset = 5
    if gtype & _EWKB_SRID:
        offset += 4
    if gtype & (_EWKB_Z | _EWKB_M):  # EWKB: flags in the high bits, base type in the low ones
        has_z, has_m, base = bool(gtype & _EWKB_Z), bool(gtype & _EWKB_M), gtype & 0xFFFF
    else:
        has_z, has_m, base = gtype // 1000 in (1, 3), gtype // 1000 in (2, 3), gtype % 1000
    if base != 2:
        got = _WKB_TYPES.get(base, f"WKB type {gtype}")
        raise TrajectoryError(f"{_who(traj_id)}: expected a LINESTRING, got {got}", traj_id=traj_id,
                              reason="not a LINESTRING", hint="a trajectory is a LINESTRING M (M = epoch seconds)")
    if not has_m:
        raise TrajectoryError(f"{_who(traj_id)}: LINESTRING has no M (time) coordinate",
                              traj_id=traj_id, reason="no M (time) coordinate",
                              hint="store time as M: ST_MakePointM(x, y, epoch_seconds)")
    (n,) = struct.unpack_from(order + "I", buf, offset)
    dims = 4 if has_z else 3
    if len(buf) < offset + 4 + 8 * n * dims:
        raise TrajectoryError(f"{_who(traj_id)}: truncated WKB ({n} points announced, {len(buf)} bytes)",
                              traj_id=traj_id, reason="not WKB")
    coords = np.frombuffer(buf, dtype=np.dtype(np.float64).newbyteorder(order), count=n * dims,
                           offset=offset + 4).reshape(n, dims)
    return validate(Trajectory(traj_id, coords[:, dims - 1] * time_scale,
                               coords[:, 1].astype(np.float64), coords[:, 0].astype(np.float64),
                               z=coords[:, 2].astype(np.float64) if has_z else None))


def validate(traj: Trajectory) -> Trajectory:
    """Reject what no cleaning step can repair, naming the trajectory, the fix (numbered from 1, as
    everywhere in pgtraj) and the offending value."""
    tid = traj.id
    if len(traj) == 0:
        raise TrajectoryError(f"{_who(tid)}: no points", traj_id=tid, reason="no points")
    for name, arr in (("time (M)", traj.t), ("latitude", traj.lat), ("longitude", traj.lon)):
        bad = ~np.isfinite(arr)
        if bad.any():
            i = int(np.argmax(bad))
            raise TrajectoryError(f"{_who(tid)}: {name} of fix {i + 1} is {arr[i]}", traj_id=tid,
                                  reason="NaN or infinite value")
    for name, arr, limit in (("latitude", traj.lat, 90.0), ("longitude", traj.lon, 180.0)):
        bad = np.abs(arr) > limit
        if bad.any():
            i = int(np.argmax(bad))
            raise TrajectoryError(f"{_who(tid)}: {name} {arr[i]} of fix {i + 1} is out of range",
                                  traj_id=tid, reason="coordinates out of range",
                                  hint="is the SRID right? coordinates must transform to WGS84")
    if np.median(traj.t) > _MAX_EPOCH_SECONDS:
        raise TrajectoryError(
            f"{_who(tid)}: M values look like milliseconds (median {np.median(traj.t):.0f}), not seconds",
            traj_id=tid, reason="M in milliseconds, not seconds",
            hint="divide M by 1000 (or read with time_unit='ms')")
    bad = (traj.t < _EPOCH_RANGE[0]) | (traj.t > _EPOCH_RANGE[1])
    if bad.any():
        i = int(np.argmax(bad))
        raise TrajectoryError(f"{_who(tid)}: time (M) {traj.t[i]:.6g} of fix {i + 1} is not epoch seconds of a"
                              " year from 1 to 9999", traj_id=tid, reason="time (M) out of range",
                              hint="M must be seconds since 1970-01-01 UTC: extract(epoch FROM t)")
    return traj


def check_time_order(traj: Trajectory) -> Trajectory:
    """Refuse a trajectory whose time goes backwards, or stands still from its first fix to its last:
    a model reading it would see moves that never happened. (Training data is repaired by cleaning
    instead: sorted, duplicates dropped, each change counted.)"""
    if len(traj) > 1:
        back = np.flatnonzero(np.diff(traj.t) < 0)
        if len(back):
            i = int(back[0]) + 1
            raise TrajectoryError(f"{_who(traj.id)}: time (M) goes backwards at fix {i + 1} ({traj.t[i]:.0f} after"
                                  f" {traj.t[i - 1]:.0f})", traj_id=traj.id, reason="time goes backwards",
                                  hint="M must increase along the line: build it ordered by time"
                                       " (pgtraj.line(points, times) sorts the fixes)")
        if traj.t[0] == traj.t[-1]:
            raise TrajectoryError(f"{_who(traj.id)}: all {len(traj)} fixes have the same time (M = {traj.t[0]:.0f})",
                                  traj_id=traj.id, reason="time stands still",
                                  hint="M must be each fix's own time in epoch seconds")
    return traj


def _who(traj_id) -> str:
    return "trajectory" if traj_id is None else f"trajectory {traj_id!r}"


def haversine_m(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in metres (vectorised)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dphi, dlmb = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def bearing_deg(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Initial bearing in degrees clockwise from north, in [0, 360)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dlmb = np.radians(np.asarray(lon2) - np.asarray(lon1))
    y = np.sin(dlmb) * np.cos(p2)
    x = np.cos(p1) * np.sin(p2) - np.sin(p1) * np.cos(p2) * np.cos(dlmb)
    return np.degrees(np.arctan2(y, x)) % 360.0
