"""Parsing, validation and cleaning of trajectories (pure numpy; no database needed)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pgtraj.core.clean import (
    CleaningConfig,
    CleaningError,
    CleaningOptions,
    CleaningReport,
    check_discard,
    clean,
    stay_points,
)
from pgtraj.core.errors import ConfigError, TrajectoryError
from pgtraj.core.synthetic import grid_trips
from pgtraj.core.trajectory import Trajectory, from_wkb, haversine_m

T0 = 1_224_730_384.0


def wkb(points, order="<", gtype=2002, srid=None):
    """ISO WKB (or EWKB with srid) of a line string: what PostGIS ST_AsBinary/ST_AsEWKB produce."""
    head = bytes([1 if order == "<" else 0])
    if srid is not None:
        head += struct.pack(order + "II", gtype, srid)
    else:
        head += struct.pack(order + "I", gtype)
    body = struct.pack(order + "I", len(points)) + b"".join(struct.pack(order + "d" * len(p), *p) for p in points)
    return head + body


def traj(t, lat=None, lon=None):
    t = np.asarray(t, dtype=np.float64)
    lat = np.full(len(t), 39.9) if lat is None else np.asarray(lat, float)
    lon = np.full(len(t), 116.3) if lon is None else np.asarray(lon, float)
    return Trajectory("x", t, lat, lon)


@pytest.mark.parametrize("order", ["<", ">"])
def test_from_wkb_iso_m_both_byte_orders(order):
    tr = from_wkb(7, wkb([(116.3, 39.9, T0), (116.31, 39.91, T0 + 5.5)], order))
    assert tr.id == 7 and tr.t.tolist() == [T0, T0 + 5.5]
    assert tr.lat.tolist() == [39.9, 39.91] and tr.lon.tolist() == [116.3, 116.31]
    assert tr.t.dtype == np.float64


def test_from_wkb_zm_and_ewkb():
    zm = from_wkb(1, wkb([(116.3, 39.9, 50.0, T0), (116.31, 39.91, 51.0, T0 + 1)], gtype=3002))
    assert zm.t.tolist() == [T0, T0 + 1] and zm.lat.tolist() == [39.9, 39.91]
    ewkb = from_wkb(2, wkb([(116.3, 39.9, T0)], gtype=0x40000002 | 0x20000000, srid=4326))
    assert ewkb.t.tolist() == [T0]


def test_float64_time_keeps_sub_second_precision():
    # float32 epoch seconds would round these to the same value (a bug in a seed paper's code)
    tr = from_wkb(1, wkb([(116.3, 39.9, T0 + 0.25), (116.3, 39.9, T0 + 0.75)]))
    assert tr.t[1] - tr.t[0] == 0.5
    assert np.float32(T0 + 0.25) == np.float32(T0 + 0.75)


@pytest.mark.parametrize("points, gtype, reason", [
    ([(116.3, 39.9)], 2, "no M (time) coordinate"),
    ([(116.3, 39.9, T0)], 2001, "not a LINESTRING"),
    ([(116.3, 95.0, T0)], 2002, "coordinates out of range"),
    ([(200.0, 39.9, T0)], 2002, "coordinates out of range"),
    ([(116.3, float("nan"), T0)], 2002, "NaN or infinite value"),
    ([(116.3, 39.9, float("inf"))], 2002, "NaN or infinite value"),
    ([(116.3, 39.9, T0 * 1000), (116.3, 39.9, T0 * 1000 + 1000)], 2002, "M in milliseconds, not seconds"),
    ([], 2002, "no points"),
])
def test_from_wkb_rejects_with_reason(points, gtype, reason):
    with pytest.raises(TrajectoryError) as err:
        from_wkb("t1", wkb(points, gtype=gtype))
    assert err.value.reason == reason and err.value.traj_id == "t1" and "'t1'" in err.value.message


def test_milliseconds_are_read_with_a_scale():
    tr = from_wkb(1, wkb([(116.3, 39.9, T0 * 1000), (116.3, 39.9, T0 * 1000 + 1500)]), time_scale=0.001)
    assert tr.t.tolist() == [T0, T0 + 1.5]


def test_not_wkb():
    with pytest.raises(TrajectoryError, match="not WKB"):
        from_wkb(1, b"\x01\x02")


def test_clean_time_order_and_duplicates_counted():
    report = CleaningReport()
    t = T0 + np.array([0, 10, 10, 5, 20, 30, 40, 50, 60, 70], float)
    lat = 39.9 + np.arange(10) * 1e-4
    (piece,) = clean(traj(t, lat), CleaningConfig(min_points=3, min_duration_s=0), report)
    assert report.counts["duplicate_timestamps"] == 1 and report.counts["out_of_order"] == 1
    assert np.all(np.diff(piece.t) > 0) and len(piece) == 8
    assert report.counts["points_in"] == 10 and report.counts["points_out"] == 8


def test_clean_removes_gps_spike_but_keeps_the_trip():
    t = T0 + np.arange(20) * 5.0
    lat = 39.9 + np.arange(20) * 2e-4  # ~4.4 m/s
    lat[10] += 0.05                     # 5.5 km away for one fix
    report = CleaningReport()
    (piece,) = clean(traj(t, lat), report=report)
    assert report.counts["speed_outliers"] == 1 and len(piece) == 19
    assert t[10] not in piece.t and t[9] in piece.t and t[11] in piece.t


def test_clean_per_mode_speed_limit():
    t = T0 + np.arange(30) * 5.0
    lat = 39.9 + np.arange(30) * 0.0005  # 55 m per 5 s = 11 m/s: fine for a car, not for walking
    assert len(clean(traj(t, lat), mode="car")[0]) == 30
    report = CleaningReport()
    assert clean(traj(t, lat), mode="walk", report=report) == []
    assert report.counts["jump_splits"] > 0


def test_clean_splits_on_gaps_and_drops_short_pieces():
    t = np.concatenate([T0 + np.arange(10) * 10.0, T0 + 5000 + np.arange(10) * 10.0, T0 + 20000 + np.arange(2)])
    report = CleaningReport()
    pieces = clean(traj(t, 39.9 + np.arange(len(t)) * 1e-5), CleaningConfig(max_gap_s=600), report)
    assert [p.part for p in pieces] == [0, 1] and [len(p) for p in pieces] == [10, 10]
    assert report.counts["gap_splits"] == 2 and report.counts["short_pieces"] == 1
    assert report.counts["short_piece_points"] == 2
    assert "2 splits on time gaps" in report.summary()


def test_clean_single_point_is_reported_not_crashed():
    report = CleaningReport()
    assert clean(traj([T0]), report=report) == []
    assert report.counts["short_pieces"] == 1


def test_stay_points():
    # 30 min standing still (with 10 m jitter), then driving away
    rng = np.random.default_rng(1)
    t = T0 + np.arange(200) * 10.0
    lat = np.concatenate([39.9 + rng.normal(0, 5e-5, 180), 39.9 + np.arange(1, 21) * 0.002])
    sps = stay_points(traj(t, lat), max_distance_m=200, min_duration_s=1200)
    assert len(sps) == 1
    sp = sps[0]
    assert sp.first == 0 and 170 <= sp.last <= 180 and sp.departure - sp.arrival >= 1200
    assert haversine_m(sp.lat, sp.lon, 39.9, 116.3) < 20


def test_stay_points_on_a_long_moving_trajectory_is_linear():
    tr = grid_trips(1, seed=3)[0]
    assert stay_points(tr) == []


def test_synthetic_trips_are_deterministic_and_plausible():
    a, b = grid_trips(5, seed=9), grid_trips(5, seed=9)
    assert all(np.array_equal(x.lat, y.lat) and np.array_equal(x.t, y.t) for x, y in zip(a, b))
    for tr in a:
        v = haversine_m(tr.lat[:-1], tr.lon[:-1], tr.lat[1:], tr.lon[1:]) / np.diff(tr.t)
        assert np.median(v) < 20 and np.all(np.diff(tr.t) > 0)


def flight(speed_mps: float, n: int = 400, dt: float = 4.0, spikes: int = 0) -> Trajectory:
    """A straight track at ``speed_mps`` with a fix every ``dt`` s, and ``spikes`` single-fix GPS jumps."""
    t = T0 + np.arange(n) * dt
    lat = 30.0 + np.arange(n) * speed_mps * dt / 111_195.0
    lon = np.full(n, 10.0)
    lon[np.linspace(50, n - 50, spikes).astype(int)] += 0.5  # ~48 km off for one fix
    return Trajectory("f", t, lat, lon)


def test_auto_cleaning_takes_its_thresholds_from_the_data():
    """An airliner's fixes are plausible for an airliner: the data-driven default keeps them (and still
    removes GPS jumps) where the walking profile would throw almost all of them away."""
    tracks = [flight(230.0, spikes=3) for _ in range(3)]
    config, why = CleaningOptions().resolve(tracks)
    assert config.max_speed_mps == pytest.approx(3 * 230.0, rel=0.01) and "auto" in why and "90th-percentile speeds" in why
    assert config.max_gap_s == 600  # 30 x 4 s is less than the 10-minute floor
    report = CleaningReport()
    kept = [p for tr in tracks for p in clean(tr, config, report)]
    assert report.counts["speed_outliers"] == 9 and sum(len(p) for p in kept) == 3 * 397
    assert check_discard(report, 0.2) == pytest.approx(9 / 1200)

    walk, why = CleaningOptions(profile="walk").resolve(tracks)
    assert (walk.max_speed_mps, walk.max_gap_s) == (7.0, 600.0) and why.endswith("(profile walk)")
    report = CleaningReport()
    for tr in tracks:
        clean(tr, walk, report)
    with pytest.raises(CleaningError, match=r"cleaning discarded 100\.0% of the 1,200 fixes .*more than max_discard"
                                            r" 20%") as err:
        check_discard(report, 0.2)
    assert "--profile" in err.value.hint and "--allow-discard" in err.value.hint
    assert check_discard(report, 1.0) == 1.0  # accepted when asked for


def test_cleaning_options_are_checked_and_explicit_values_win():
    config, why = CleaningOptions(profile="vessel", max_gap_s=900).resolve([flight(8.0)])
    assert (config.max_speed_mps, config.max_gap_s) == (30.0, 900.0) and "max_gap_s as given" in why
    for bad in ({"profile": "spaceship"}, {"max_speed_mps": -1}, {"max_discard": 1.5}, {"min_points": 1}):
        with pytest.raises(ConfigError):
            CleaningOptions(**bad)


def test_altitude_travels_from_wkb_through_cleaning_to_tokens_and_features():
    from pgtraj.core.features import ALTITUDE, LOG_ALTITUDE_SCALE, continuous
    from pgtraj.core.tokenizer import Tokenizer, TokenizerConfig
    from pgtraj.core.trajectory import to_wkb

    n = 60
    tr = Trajectory("a", T0 + np.arange(n) * 10.0, 52.0 + np.arange(n) * 2e-3, np.full(n, 4.3),
                    z=1000.0 + np.arange(n) * 50.0)
    back = from_wkb("a", to_wkb(tr))
    assert np.array_equal(back.z, tr.z) and np.array_equal(back.t, tr.t)
    assert from_wkb("a", to_wkb(Trajectory("b", tr.t, tr.lat, tr.lon))).z is None
    (piece,) = clean(back, CleaningConfig())
    assert np.array_equal(piece.z, tr.z)
    tok = Tokenizer.fit([piece], TokenizerConfig(resolution=9, min_count=1))
    x = tok.encode(piece)
    assert np.isfinite(x.alt).all() and np.all(np.diff(x.alt) > 0)  # interpolated cells get it too
    assert x.alt[0] == pytest.approx(np.mean(tr.z[: np.argmax(x.t > x.t[0]) or 1]), rel=0.05)
    cols = continuous(x)
    assert cols[0, ALTITUDE] == pytest.approx(np.log1p(x.alt[0]) / LOG_ALTITUDE_SCALE, rel=1e-5)
    flat = tok.encode(Trajectory("c", tr.t, tr.lat, tr.lon))
    assert np.isnan(flat.alt).all() and (continuous(flat)[:, ALTITUDE] == 0).all()
