"""The H3 tokenizer: vocabulary with hierarchical fallback, features, interpolation, serialisation."""

from __future__ import annotations

import h3
import numpy as np
import pytest

from pgtraj.core.synthetic import grid_trips
from pgtraj.core.tokenizer import (
    JUMP,
    SPECIAL_TOKENS,
    START,
    UNK,
    Tokenizer,
    TokenizerConfig,
    TokenizerError,
    cell_parents,
    choose_resolution,
    move_frames,
    moves,
)
from pgtraj.core.trajectory import Trajectory, bearing_deg

TRIPS = grid_trips(60, seed=1)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.fit(TRIPS[:50], TokenizerConfig(resolution=10, min_count=3, coarsest_resolution=6))


def test_cell_parents_matches_h3():
    rng = np.random.default_rng(0)
    cells = np.array([h3.str_to_int(h3.latlng_to_cell(la, lo, 10))
                      for la, lo in zip(rng.uniform(-80, 80, 200), rng.uniform(-180, 180, 200))], np.uint64)
    for res in range(0, 11):
        expected = [h3.str_to_int(h3.cell_to_parent(h3.int_to_str(int(c)), res)) for c in cells]
        assert cell_parents(cells, res).tolist() == expected


def test_vocabulary_levels_and_coverage(tok):
    assert tok.vocab_size == len(SPECIAL_TOKENS) + len(tok.vocab)
    resolutions = {h3.get_resolution(h3.int_to_str(int(c))) for c in tok.vocab}
    assert 10 in resolutions and resolutions <= set(range(6, 11))
    levels = tok.coverage["by_resolution"]
    assert sum(v["visits"] for v in levels.values()) == tok.coverage["training_visits"]
    assert abs(sum(v["share_of_visits"] for v in levels.values()) - 1.0) < 1e-5


def test_rare_and_unseen_cells_fall_back_to_ancestors(tok):
    res10 = {int(c) for c in tok.vocab if h3.get_resolution(h3.int_to_str(int(c))) == 10}
    vocab_set = {int(c) for c in tok.vocab}
    # a fine cell next to the training area that was never visited: must map to an ancestor, not UNK
    unseen = next(int(n) for c in res10 for n in (h3.str_to_int(x) for x in h3.grid_ring(h3.int_to_str(c), 3))
                  if int(n) not in vocab_set)
    (tid,) = tok.lookup(np.array([unseen], np.uint64))
    assert tid != UNK
    ancestor = tok.token_cell(int(tid))
    assert h3.cell_to_parent(h3.int_to_str(unseen), h3.get_resolution(h3.int_to_str(ancestor))) == h3.int_to_str(ancestor)
    # far away (another continent): no ancestor known -> UNK
    far = h3.str_to_int(h3.latlng_to_cell(-33.9, 18.4, 10))
    assert tok.lookup(np.array([far], np.uint64)).tolist() == [UNK]


def test_held_out_trips_are_covered_without_unk(tok):
    for tr in TRIPS[50:]:
        x = tok.encode(tr)
        assert (x.tokens != UNK).all()
        assert (x.tokens >= len(SPECIAL_TOKENS)).all() and (x.tokens < tok.vocab_size).all()


def test_encode_features(tok):
    tr = TRIPS[0]
    x = tok.encode(tr)
    n = len(x)
    assert all(len(getattr(x, f)) == n for f in x.FIELDS)
    assert x.t.dtype == np.float64 and x.t[0] == tr.t[0]
    assert np.all(np.diff(x.t) >= 0) and x.dt[0] == 0 and np.allclose(x.dt[1:], np.diff(x.t), atol=1e-3)
    assert np.all(x.dwell >= 0)
    # consecutive duplicates are collapsed: no two neighbouring tokens share a fine cell
    assert np.all(x.cells[1:] != x.cells[:-1])
    # observed fixes lie inside their cell: offsets within about one edge length of the centre
    assert np.all(np.abs(x.offset[~x.interpolated]) < 1.5)
    assert np.all((x.heading >= 0) & (x.heading < 360))
    assert np.median(x.speed[1:]) < 30


def test_interpolation_makes_paths_contiguous():
    tr = TRIPS[0]
    sparse = tr.take(slice(0, None, 8))  # drop 7 of 8 fixes: cells get skipped
    tok = Tokenizer.fit(TRIPS, TokenizerConfig(resolution=10, min_count=1, interpolate=True))
    x = tok.encode(sparse)
    assert x.interpolated.any()
    cells = [h3.int_to_str(int(c)) for c in x.cells]
    assert all(h3.are_neighbor_cells(a, b) for a, b in zip(cells, cells[1:]))
    plain = Tokenizer(TokenizerConfig(resolution=10, min_count=1, interpolate=False), tok.vocab).encode(sparse)
    assert not plain.interpolated.any() and len(plain) < len(x)
    assert x.t[x.interpolated].min() > x.t[0]


def test_time_features_in_the_configured_zone():
    # 2008-10-23 02:53:04 UTC is a Thursday, 10:53 in Beijing
    tr = Trajectory(1, np.array([1224730384.0, 1224730390.0]), np.array([39.9, 39.91]), np.array([116.3, 116.3]))
    for zone, dow, minute in (("UTC", 3, 2 * 60 + 53), ("Asia/Shanghai", 3, 10 * 60 + 53)):
        tok = Tokenizer.fit([tr], TokenizerConfig(resolution=10, min_count=1, timezone=zone, interpolate=False))
        x = tok.encode(tr)
        assert (int(x.dow[0]), int(x.minute[0])) == (dow, minute)


def test_local_time_is_each_fixs_own_zone_and_daylight_saving_time():
    """'auto' reads each fix's zone from where it is; the offset is the one in force at that instant, so a
    trip across the DST switch changes clock there (Amsterdam: 2024-03-31 01:00 UTC, 02:00 -> 03:00)."""
    switch = 1711846800.0
    t = np.array([switch - 120, switch + 120])
    auto, utc = Tokenizer(TokenizerConfig()), Tokenizer(TokenizerConfig(timezone="UTC"))
    assert TokenizerConfig().timezone == "auto"
    dow, minute = auto.local_time(t, np.array([52.37, 52.37]), np.array([4.90, 4.90]))
    assert minute.tolist() == [60 + 58, 3 * 60 + 2] and dow.tolist() == [6, 6]  # Sunday 01:58, then 03:02
    assert utc.local_time(t, np.array([52.37] * 2), np.array([4.9] * 2))[1].tolist() == [58, 62]
    # the same instant in Beijing, Lima and on the open Atlantic (Etc/GMT+2: two hours behind UTC)
    _, minute = auto.local_time(np.full(3, switch), np.array([39.9, -12.05, -10.0]), np.array([116.4, -77.04, -30.0]))
    assert minute.tolist() == [9 * 60, 20 * 60, 23 * 60]


@pytest.mark.parametrize("speed, res", [(1.4, 10), (12.0, 8), (230.0, 5)])
def test_resolution_is_chosen_so_that_a_minute_of_motion_is_about_one_cell(speed, res):
    # fixes every 10 s at a constant speed due north (walker, car or ship, airliner)
    t = 1.7e9 + np.arange(200) * 10.0
    lat = 10.0 + np.arange(200) * speed * 10.0 / 111_195.0
    chosen, why = choose_resolution([Trajectory(1, t, lat, np.full(200, 20.0))])
    assert chosen == res and f"resolution {res}" in why and f"{speed:.1f} m/s" in why


def test_json_round_trip_is_exact(tok):
    again = Tokenizer.from_json(tok.to_json())
    assert again.config == tok.config and np.array_equal(again.vocab, tok.vocab)
    for tr in TRIPS[50:55]:
        assert again.encode(tr).to_bytes() == tok.encode(tr).to_bytes()


@pytest.mark.parametrize("kwargs, text", [
    ({"resolution": 4}, "resolution must be 5-12"),
    ({"resolution": 13}, "resolution must be 5-12"),
    ({"min_count": 0}, "min_count"),
    ({"coarsest_resolution": 10, "resolution": 9}, "coarsest_resolution"),
    ({"timezone": "Mars/Olympus"}, "unknown timezone"),
])
def test_bad_config(kwargs, text):
    with pytest.raises(TokenizerError, match=text):
        TokenizerConfig(**kwargs)


def test_vocabulary_of_one_cell_is_refused():
    still = Trajectory(1, 1224730384.0 + np.arange(10.0), np.full(10, 39.9), np.full(10, 116.3))
    with pytest.raises(TokenizerError, match="covers 1 cell"):
        Tokenizer.fit([still], TokenizerConfig(resolution=9, min_count=1, coarsest_resolution=9))


def test_no_training_data_is_refused():
    with pytest.raises(TokenizerError, match="no trajectories"):
        Tokenizer.fit([])


def test_not_a_tokenizer_json():
    with pytest.raises(TokenizerError, match="not a pgtraj tokenizer"):
        Tokenizer.from_json('{"format": "something else"}')


def _centre(c):
    return h3.cell_to_latlng(h3.int_to_str(int(c)))


@pytest.mark.parametrize("lat, lon", [(39.9, 116.4), (-3.85, -32.42), (52.37, 4.9), (-12.1, -77.0)])
def test_move_frames_order_neighbours_by_angle_from_the_way_in(lat, lon):
    """Every frame lists the six neighbours once, slot 0 the one straight on and the others clockwise
    60 degrees apart, in any hemisphere; a move is the next cell's slot."""
    a = h3.str_to_int(h3.latlng_to_cell(lat, lon, 9))
    b = h3.str_to_int(h3.grid_ring(h3.int_to_str(a), 1)[0])
    frame = move_frames(np.array([a, b], np.uint64))[1]
    assert sorted(frame.tolist()) == sorted(h3.str_to_int(c) for c in h3.grid_ring(h3.int_to_str(b), 1))
    way_in = bearing_deg(*_centre(a), *_centre(b))
    turns = [(bearing_deg(*_centre(b), *_centre(c)) - way_in) % 360 for c in frame]
    for slot, turn in enumerate(turns):
        assert min(abs(turn - 60 * slot), 360 - abs(turn - 60 * slot)) < 15, (slot, turns)
    assert frame[3] == a  # slot 3 is back where it came from
    path = np.array([a, b, frame[0], a], np.uint64)
    assert moves(path).tolist() == [START, moves(path[:2])[1], 0, JUMP]


def test_moves_of_a_straight_road_go_on_and_never_back(tok):
    x = tok.encode(Trajectory("line", np.arange(40) * 30.0, np.linspace(40.00, 40.05, 40), np.full(40, 116.3)))
    assert x.move[0] == START and len(x) > 10
    # it zigzags across the hexagons (up to 120 degrees where it runs along their edges) but never turns
    # back, nor jumps (the tokenizer fills skipped cells in)
    assert set(x.move[1:].tolist()) <= {0, 1, 2, 4, 5} and np.mean(x.move[1:] == 0) > 0.3
    assert np.array_equal(x.move, moves(x.cells))


def test_a_pentagon_frame_has_an_empty_slot():
    pent = h3.str_to_int(h3.get_pentagons(9)[0])
    before = h3.str_to_int(h3.grid_ring(h3.int_to_str(pent), 1)[0])
    frame = move_frames(np.array([before, pent], np.uint64))[1]
    assert (frame == 0).sum() == 1 and frame[-1] == 0
