"""The spatial tokenizer: trajectories -> H3 cell tokens with time and continuous features.

Runs unchanged in the client (training) and inside PostgreSQL (inference): numpy + h3 only.

* Fixes map to H3 cells at ``resolution`` (5-12; ``choose_resolution`` picks one from the data); consecutive fixes in one cell collapse into one token
  that keeps its dwell time; optionally, cells skipped between two fixes are filled in along the H3 grid
  path so every step goes to a neighbour.
* The vocabulary is learnt from training data with a **hierarchical fallback**: a cell seen fewer than
  ``min_count`` times is not a token itself; its visits count towards its parent cell, and so on up to
  ``coarsest_resolution``. At encoding time a cell maps to its nearest ancestor in the vocabulary, so an
  unseen fine cell becomes UNK only when no ancestor was ever seen.
* Per token: entry time (float64 epoch s), dwell, delta-t, day of week and minute of day (local time where
  the token is: its time zone from an offline lookup of its position, ``timezone: 'auto'``, or one fixed zone;
  DST-correct at each token through zoneinfo), the mean fix position's offset from the cell centre (in cell edge lengths), speed and
  heading from the previous token, and the **move** that reached it: which of the previous cell's six grid
  neighbours it is, counted from "straight on" (see ``move_frames``). Moves mean the same everywhere on
  Earth, vocabulary tokens only where the training data went: a model that predicts moves can name any
  cell, in places it never saw.
"""

from __future__ import annotations

import functools
import itertools
import json
import zoneinfo
from dataclasses import asdict, dataclass, field
from datetime import datetime

import h3
import h3.api.numpy_int as h3i
import numpy as np
import tzfpy

from pgtraj.core.errors import ConfigError, PgtrajError, config_from_dict
from pgtraj.core.trajectory import M_PER_DEG, Trajectory, bearing_deg, haversine_m

PAD, MASK, UNK, BOS, EOS = 0, 1, 2, 3, 4
SPECIAL_TOKENS = ("[PAD]", "[MASK]", "[UNK]", "[BOS]", "[EOS]")
# moves: slots 0-5 of the previous cell's move frame (0 straight on, 1/5 60 degrees right/left, 2/4 120
# degrees right/left, 3 back), a jump to a cell that is not a neighbour, the first token of a trajectory
N_SLOTS, JUMP, START = 6, 6, 7
N_MOVES = 8
FORMAT = "pgtraj.tokenizer/1"
# bounds on what a tokenizer may ask for: one from a caller (pgtraj.tokenize(traj, tokenizer)) must not be
# able to turn a short trajectory into millions of tokens, or a JSON document into gigabytes
MAX_INTERPOLATION_CELLS = 64
MAX_VOCAB = 10_000_000
RESOLUTIONS = range(5, 13)
# timezone: each token's local time in the zone of where it is (tzfpy's offline map of the world's zones,
# Etc/GMT+n at sea); a zone name instead fixes one zone for every trip
AUTO_ZONE = "auto"
# H3 index layout: resolution in bits 52-55, then one 3-bit digit per resolution, res 15 in bits 0-2
_RES_SHIFT, _RES_MASK = np.uint64(52), np.uint64(0xF << 52)


class TokenizerError(PgtrajError, ValueError):
    """The tokenizer cannot be built or loaded as asked."""


@dataclass
class TokenizerConfig:
    resolution: int = 9
    min_count: int = 5
    coarsest_resolution: int = 5
    interpolate: bool = True
    max_interpolation_cells: int = 32  # a longer jump stays a jump: inventing a path would be fiction
    timezone: str = AUTO_ZONE          # for day-of-week and minute-of-day features: 'auto' or a zone name

    def __post_init__(self):
        for name, kind in (("resolution", int), ("min_count", int), ("coarsest_resolution", int),
                           ("max_interpolation_cells", int), ("interpolate", bool), ("timezone", str)):
            value = getattr(self, name)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise TokenizerError(f"tokenizer {name} must be {'an integer' if kind is int else kind.__name__},"
                                     f" not {value!r}")
        if self.resolution not in RESOLUTIONS:
            raise TokenizerError(f"resolution must be {RESOLUTIONS[0]}-{RESOLUTIONS[-1]}, not {self.resolution}",
                                 hint="H3 cells are about 9 km across at 5, 0.5 km at 8 and 9 m at 12; leave it out"
                                      " to have it chosen from the data")
        if not 0 <= self.coarsest_resolution <= self.resolution:
            raise TokenizerError(f"coarsest_resolution must be 0-{self.resolution}, not {self.coarsest_resolution}")
        if self.min_count < 1:
            raise TokenizerError(f"min_count must be >= 1, not {self.min_count}")
        if not 0 <= self.max_interpolation_cells <= MAX_INTERPOLATION_CELLS:
            raise TokenizerError(f"max_interpolation_cells must be 0-{MAX_INTERPOLATION_CELLS}, not"
                                 f" {self.max_interpolation_cells}", hint="a longer jump stays a jump")
        if self.timezone != AUTO_ZONE:
            try:
                zoneinfo.ZoneInfo(self.timezone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise TokenizerError(f"unknown timezone {self.timezone!r}",
                                     hint="'auto' (each fix's own zone, from where it is) or an IANA name such as"
                                          " 'Europe/Rotterdam' or 'UTC'") from None


@dataclass
class Tokens:
    """One tokenized trajectory: aligned arrays, one entry per token."""

    tokens: np.ndarray      # int32 vocabulary ids
    cells: np.ndarray       # uint64 H3 cells at the tokenizer's resolution
    t: np.ndarray           # float64 epoch seconds when the cell was entered
    dwell: np.ndarray       # float32 s between the first and last fix in the cell
    dt: np.ndarray          # float32 s since the previous token (0 for the first)
    dow: np.ndarray         # int8, 0 = Monday
    minute: np.ndarray      # int16 minute of the day
    offset: np.ndarray      # float32 (n, 2): east/north offset of the fixes' mean from the cell centre / edge length
    speed: np.ndarray       # float32 m/s from the previous token's position
    heading: np.ndarray     # float32 degrees clockwise from north
    interpolated: np.ndarray  # bool: inserted along the grid path, not observed
    move: np.ndarray        # int8: slot of this cell in the previous cell's move frame, JUMP or START
    alt: np.ndarray         # float32 mean altitude (Z) of the fixes, NaN where the trajectory has none

    def __len__(self) -> int:
        return len(self.tokens)

    FIELDS = ("tokens", "cells", "t", "dwell", "dt", "dow", "minute", "offset", "speed", "heading", "interpolated",
              "move", "alt")

    def slice(self, start: int | None = None, stop: int | None = None) -> "Tokens":
        """Tokens ``start`` to ``stop`` (views)."""
        return Tokens(*(getattr(self, f)[start:stop] for f in self.FIELDS))

    def to_bytes(self) -> bytes:
        """Canonical byte form (what the client/server parity test compares)."""
        return b"".join(np.ascontiguousarray(getattr(self, f)).tobytes() for f in self.FIELDS)


def move_frames(cells: np.ndarray) -> np.ndarray:
    """(n, 6) uint64: for each cell of a path (consecutive cells differ), its grid neighbours in the order of
    their direction relative to the move that entered it (from the cell before; north for the first):
    slot 0 is the neighbour straight on, then clockwise (1: 60 degrees right, ..., 5: 60 degrees left).
    A pentagon's missing sixth neighbour is 0. The next cell's slot in this frame is its move."""
    cells = np.asarray(cells, dtype=np.uint64)
    frames = np.zeros((len(cells), N_SLOTS), np.uint64)
    if not len(cells):
        return frames
    uniq, inv = np.unique(cells, return_inverse=True)
    rings = np.zeros((len(uniq), N_SLOTS), np.uint64)
    for j, c in enumerate(uniq.tolist()):
        ring = [n for n in h3i.grid_disk(c, 1).tolist() if n != c]
        rings[j, :len(ring)] = ring
    ring = rings[inv]                                                     # (n, 6)
    known = np.unique(np.concatenate([uniq, rings.reshape(-1)]))          # each centre computed once
    at = cell_latlng(known)
    centre = at[np.searchsorted(known, cells)]
    ring_centre = at[np.searchsorted(known, ring.reshape(-1))].reshape(len(cells), N_SLOTS, 2)
    heading_in = np.zeros(len(cells))
    heading_in[1:] = bearing_deg(centre[:-1, 0], centre[:-1, 1], centre[1:, 0], centre[1:, 1])
    rel = (bearing_deg(centre[:, None, 0], centre[:, None, 1], ring_centre[..., 0], ring_centre[..., 1])
           - heading_in[:, None] + 30.0) % 360.0
    rel[ring == 0] = np.inf                                               # a pentagon's gap goes last
    return np.take_along_axis(ring, np.argsort(rel, axis=1, kind="stable"), axis=1)


def moves(cells: np.ndarray, frames: np.ndarray | None = None) -> np.ndarray:
    """int8 (n,): each cell's slot in the previous cell's move frame, JUMP when it is no neighbour, START
    for the first."""
    cells = np.asarray(cells, dtype=np.uint64)
    frames = move_frames(cells) if frames is None else frames
    out = np.full(len(cells), START, np.int8)
    if len(cells) > 1:
        hit = frames[:-1] == cells[1:, None]
        out[1:] = np.where(hit.any(axis=1), hit.argmax(axis=1), JUMP)
    return out


def cell_latlng(cells: np.ndarray) -> np.ndarray:
    """(n, 2) lat/lon of cell centres (0, 0 for the null cell 0)."""
    out = np.zeros((len(cells), 2))
    for i, c in enumerate(cells.tolist()):
        if c:
            out[i] = h3i.cell_to_latlng(c)
    return out


def cell_parents(cells: np.ndarray, res: int) -> np.ndarray:
    """Vectorised h3.cell_to_parent for cells at resolution >= res."""
    cells = np.asarray(cells, dtype=np.uint64)
    below = np.uint64((1 << (3 * (15 - res))) - 1)  # digits res+1..15 set to 7 ("unused")
    return ((cells | below) & ~_RES_MASK) | (np.uint64(res) << _RES_SHIFT)


@dataclass
class Tokenizer:
    config: TokenizerConfig = field(default_factory=TokenizerConfig)
    vocab: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # sorted cells, mixed resolutions
    coverage: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.vocab)

    # ------------------------------------------------------------------ vocabulary
    @classmethod
    def fit(cls, trajectories, config: TokenizerConfig | None = None) -> "Tokenizer":
        """Learn the vocabulary from training trajectories (an iterable; read once)."""
        config = config or TokenizerConfig()
        tok = cls(config)
        visits = [tok._collapse(tok._cells(tr))[0] for tr in trajectories if len(tr)]
        if not visits:
            raise TokenizerError("no trajectories to build a vocabulary from")
        cells, counts = np.unique(np.concatenate(visits), return_counts=True)
        total = int(counts.sum())
        vocab, per_level = [], {}
        for res in range(config.resolution, config.coarsest_resolution - 1, -1):
            keep = counts >= (config.min_count if res > config.coarsest_resolution else 1)
            vocab.append(cells[keep])
            per_level[res] = {"cells": int(keep.sum()), "visits": int(counts[keep].sum())}
            if res > config.coarsest_resolution:  # the rest count towards their parents
                cells, inverse = np.unique(cell_parents(cells[~keep], res - 1), return_inverse=True)
                counts = np.bincount(inverse, weights=counts[~keep], minlength=len(cells)).astype(np.int64)
        tok.vocab = np.sort(np.concatenate(vocab))
        tok.coverage = {"training_visits": total,
                        "by_resolution": {str(r): {**v, "share_of_visits": round(v["visits"] / total, 6)}
                                          for r, v in per_level.items()}}
        if len(tok.vocab) < 2:
            raise TokenizerError(f"the training data covers {len(tok.vocab)} cell(s); a model needs at least 2",
                                 hint="use more data, a finer resolution, or a smaller min_count")
        return tok

    def lookup(self, cells: np.ndarray) -> np.ndarray:
        """Token ids for fine cells: the cell itself or its nearest ancestor in the vocabulary, else UNK."""
        return self._lookup_from(cells, self.config.resolution)

    def _lookup_from(self, cells: np.ndarray, start_res: int) -> np.ndarray:
        """lookup() for cells at resolution ``start_res``."""
        cells = np.asarray(cells, dtype=np.uint64)
        ids = np.full(len(cells), UNK, dtype=np.int32)
        todo = np.ones(len(cells), bool)
        for res in range(start_res, self.config.coarsest_resolution - 1, -1):
            if not todo.any() or not len(self.vocab):
                break
            cand = cell_parents(cells[todo], res) if res < start_res else cells[todo]
            pos = np.minimum(np.searchsorted(self.vocab, cand), len(self.vocab) - 1)
            hit = self.vocab[pos] == cand
            idx = np.flatnonzero(todo)[hit]
            ids[idx] = pos[hit] + len(SPECIAL_TOKENS)
            todo[idx] = False
        return ids

    def names_exactly(self, tokens: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """Per token, whether it is the cell's own token (that cell in the vocabulary at full resolution),
        not a coarser ancestor's or a special token."""
        tokens = np.asarray(tokens)
        return (tokens >= len(SPECIAL_TOKENS)) & (self.vocab[np.maximum(tokens - len(SPECIAL_TOKENS), 0)] == cells)

    def resolution_shares(self, tokens: np.ndarray) -> dict[str, float]:
        """How the given tokens resolved: share at each H3 resolution, and UNK (coverage on held-out data)."""
        tokens = np.asarray(tokens)
        cells = tokens >= len(SPECIAL_TOKENS)
        res = (self.vocab[tokens[cells] - len(SPECIAL_TOKENS)] >> _RES_SHIFT) & np.uint64(0xF)
        out = {f"res{int(r)}": round(float(n) / max(len(tokens), 1), 6) for r, n in zip(*np.unique(res, return_counts=True))}
        out["unk"] = round(float(np.sum(tokens == UNK)) / max(len(tokens), 1), 6)
        return out

    def ancestor_table(self) -> np.ndarray:
        """(vocab_size, levels) int64: for each token, its ancestors' rows in an ancestor embedding table, one
        column per resolution from ``coarsest_resolution`` up to the tokenizer's (0 = none, e.g. for special
        tokens or levels at or below the token's own resolution). The model embeds a cell as its own
        embedding plus its ancestors', so rare and fallback cells share what their region learnt."""
        cfg = self.config
        levels = list(range(cfg.coarsest_resolution, cfg.resolution))
        res = ((self.vocab >> _RES_SHIFT) & np.uint64(0xF)).astype(np.int64)
        table = np.zeros((self.vocab_size, max(len(levels), 1)), np.int64)
        parents = {lv: cell_parents(self.vocab, lv) for lv in levels}
        known = self.ancestor_cells()
        for j, lv in enumerate(levels):
            ok = res > lv
            table[len(SPECIAL_TOKENS) + np.flatnonzero(ok), j] = np.searchsorted(known, parents[lv][ok]) + 1
        return table

    def ancestor_cells(self) -> np.ndarray:
        """The sorted cells of the ancestor embedding table: row i + 1 is ``ancestor_cells()[i]``."""
        cfg = self.config
        res = ((self.vocab >> _RES_SHIFT) & np.uint64(0xF)).astype(np.int64)
        parents = [cell_parents(self.vocab[res > lv], lv) for lv in range(cfg.coarsest_resolution, cfg.resolution)]
        return np.unique(np.concatenate(parents or [np.zeros(0, np.uint64)]))

    def neighbour_table(self, k: int = 1) -> np.ndarray:
        """(vocab_size, width) int64: the tokens of the cells within ``k`` grid steps of each token's cell
        (itself included, at the token's own resolution), padded with PAD. Constrained decoding allows only
        these as the next token after a token."""
        rows: list[list[int]] = [[] for _ in range(len(SPECIAL_TOKENS))]
        res = ((self.vocab >> _RES_SHIFT) & np.uint64(0xF)).astype(np.int64)
        for c, r in zip(self.vocab.tolist(), res.tolist()):
            disk = np.array(h3i.grid_disk(int(c), k), dtype=np.uint64)
            rows.append(sorted(set(self._lookup_from(disk, r).tolist()) - {UNK}))
        width = max(len(r) for r in rows)
        return np.array([r + [PAD] * (width - len(r)) for r in rows], np.int64)

    def token_cell(self, token: int) -> int:
        """The H3 cell a (non-special) token stands for."""
        if token < len(SPECIAL_TOKENS) or token >= self.vocab_size:
            raise TokenizerError(f"token {token} is not a cell token")
        return int(self.vocab[token - len(SPECIAL_TOKENS)])

    # ------------------------------------------------------------------ encoding
    def encode(self, traj: Trajectory, check=None) -> Tokens:
        """The tokens of a trajectory. ``check``, when given, is called now and then on long inputs (inside
        PostgreSQL: to serve a pending cancel or timeout)."""
        check = check or (lambda: None)
        cells = self._cells(traj)
        check()
        run_cells, starts = self._collapse(cells)
        ends = np.concatenate([starts[1:], [len(cells)]]) - 1
        n_fix = (ends - starts + 1).astype(np.float64)
        t = traj.t[starts]
        dwell = traj.t[ends] - traj.t[starts]
        lat = np.add.reduceat(traj.lat, starts) / n_fix
        lon = np.add.reduceat(traj.lon, starts) / n_fix
        alt = np.full(len(starts), np.nan) if traj.z is None else np.add.reduceat(traj.z, starts) / n_fix
        interp = np.zeros(len(run_cells), bool)
        if self.config.interpolate and len(run_cells) > 1:
            run_cells, t, dwell, lat, lon, interp, alt = self._interpolate(run_cells, t, traj.t[ends], dwell, lat,
                                                                           lon, check, alt)
        check()
        centre = np.array([h3i.cell_to_latlng(c) for c in run_cells], dtype=np.float64).reshape(-1, 2)
        edge = h3.average_hexagon_edge_length(self.config.resolution, unit="m")
        offset = np.stack([(lon - centre[:, 1]) * np.cos(np.radians(centre[:, 0])) * M_PER_DEG / edge,
                           (lat - centre[:, 0]) * M_PER_DEG / edge], axis=1)
        dt = np.diff(t, prepend=t[:1])
        dist = np.concatenate([[0.0], haversine_m(lat[:-1], lon[:-1], lat[1:], lon[1:])])
        heading = np.concatenate([[0.0], bearing_deg(lat[:-1], lon[:-1], lat[1:], lon[1:])])
        dow, minute = self.local_time(t, lat, lon)
        return Tokens(
            tokens=self.lookup(run_cells), cells=run_cells.astype(np.uint64), t=t.astype(np.float64),
            dwell=dwell.astype(np.float32), dt=dt.astype(np.float32),
            dow=dow, minute=minute,
            offset=offset.astype(np.float32), speed=(dist / np.maximum(dt, 1e-3)).astype(np.float32),
            heading=heading.astype(np.float32), interpolated=interp, move=moves(run_cells),
            alt=alt.astype(np.float32))

    def _cells(self, traj: Trajectory) -> np.ndarray:
        # h3 has no vectorised latlng_to_cell; map() over plain floats is the cheapest exact way to call it
        res = itertools.repeat(self.config.resolution, len(traj))
        return np.fromiter(map(h3i.latlng_to_cell, traj.lat.tolist(), traj.lon.tolist(), res),
                           dtype=np.uint64, count=len(traj))

    @staticmethod
    def _collapse(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cells of the runs of equal consecutive cells, and where each run starts."""
        starts = np.flatnonzero(np.concatenate([[True], cells[1:] != cells[:-1]]))
        return cells[starts], starts

    def _interpolate(self, cells, t, t_last, dwell, lat, lon, check, alt):
        """Insert the cells skipped between consecutive tokens, entered at evenly spaced times between
        leaving the previous cell and entering the next; positioned at their centres, dwell 0, altitude
        interpolated in time."""
        at, new_cells, new_t = [], [], []
        for i in range(1, len(cells)):
            if i % 4096 == 0:
                check()
            path = self._grid_path(int(cells[i - 1]), int(cells[i]))
            if path:
                at += [i] * len(path)
                new_cells += path
                new_t += np.linspace(t_last[i - 1], t[i], len(path) + 2)[1:-1].tolist()
        if not at:
            return cells, t, dwell, lat, lon, np.zeros(len(cells), bool), alt
        centres = np.array([h3i.cell_to_latlng(c) for c in new_cells], dtype=np.float64)
        new_alt = np.interp(new_t, t, alt) if np.isfinite(alt).all() else np.full(len(new_t), np.nan)
        return (np.insert(cells, at, np.array(new_cells, np.uint64)), np.insert(t, at, new_t),
                np.insert(dwell, at, 0.0), np.insert(lat, at, centres[:, 0]), np.insert(lon, at, centres[:, 1]),
                np.insert(np.zeros(len(cells), bool), at, True), np.insert(alt, at, new_alt))

    def _grid_path(self, a: int, b: int) -> list[int]:
        """Cells strictly between a and b along the H3 grid, or [] for neighbours and for jumps too long
        (or across pentagon distortion, where H3 has no path) to fill in."""
        try:
            d = h3i.grid_distance(a, b)
            if d <= 1 or d > self.config.max_interpolation_cells:
                return []
            return [int(c) for c in h3i.grid_path_cells(a, b)[1:-1]]
        except h3.H3BaseException:
            return []

    def local_time(self, t: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Day of week (int8, 0 = Monday) and minute of day (int16) of epoch seconds ``t`` at positions
        ``lat``/``lon``, in local time: the zone of each position (``timezone: 'auto'``) or the fixed zone, with
        the UTC offset in force at that instant (so a trip across a DST switch changes offset there)."""
        t = np.asarray(t, dtype=np.float64)
        if self.config.timezone == AUTO_ZONE:
            zones = np.array([tzfpy.get_tz(x, y) or "UTC" for x, y in zip(np.asarray(lon).tolist(),
                                                                           np.asarray(lat).tolist())])
        else:
            zones = np.full(len(t), self.config.timezone)
        offset = np.zeros(len(t))
        minutes = np.floor(t / 60.0)  # offsets change on whole minutes
        for zone in np.unique(zones).tolist():
            here = zones == zone
            tz = _zone(zone)
            uniq, inv = np.unique(minutes[here], return_inverse=True)
            offset[here] = np.array([datetime.fromtimestamp(m * 60.0, tz).utcoffset().total_seconds()
                                     for m in uniq.tolist()])[inv]
        local = t + offset
        days = np.floor(local / 86400.0)
        return (((days + 3) % 7).astype(np.int8),  # 1970-01-01 was a Thursday
                np.floor((local - days * 86400.0) / 60.0).astype(np.int16))

    # ------------------------------------------------------------------ serialisation
    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "config": asdict(self.config), "special_tokens": list(SPECIAL_TOKENS),
                           "vocab": [h3.int_to_str(int(c)) for c in self.vocab], "coverage": self.coverage},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict) -> "Tokenizer":
        """A tokenizer from its JSON (to_json), checked: a malformed one raises TokenizerError naming what is
        wrong, never a KeyError or TypeError from deep inside."""
        try:
            d = json.loads(text) if isinstance(text, str) else text
        except ValueError as exc:
            raise TokenizerError(f"tokenizer is not JSON ({exc})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise TokenizerError(f"not a pgtraj tokenizer (format {d.get('format') if isinstance(d, dict) else None!r})",
                                 hint=f"expected format {FORMAT!r}, as written by Tokenizer.to_json or pgtraj train")
        if not isinstance(d.get("config"), dict):
            raise TokenizerError("tokenizer has no config object")
        try:
            config = config_from_dict(TokenizerConfig, d["config"], "tokenizer")
        except ConfigError as exc:
            raise TokenizerError(exc.message, hint=exc.hint) from None
        vocab = d.get("vocab")
        if not isinstance(vocab, list) or not all(isinstance(c, str) for c in vocab):
            raise TokenizerError("tokenizer vocab must be a list of H3 cell strings")
        if len(vocab) > MAX_VOCAB:
            raise TokenizerError(f"tokenizer vocab has {len(vocab)} cells, more than {MAX_VOCAB}")
        try:
            cells = np.array([h3.str_to_int(c) for c in vocab], dtype=np.uint64)
        except (h3.H3BaseException, ValueError):
            bad = next(c for c in vocab if not _is_cell(c))
            raise TokenizerError(f"tokenizer vocab holds {bad[:32]!r}, not an H3 cell") from None
        res = (cells >> _RES_SHIFT) & np.uint64(0xF)
        off = (res < config.coarsest_resolution) | (res > config.resolution)
        if off.any():
            raise TokenizerError(f"tokenizer vocab cell {vocab[int(np.argmax(off))]} is not at a resolution from"
                                 f" {config.coarsest_resolution} to {config.resolution}")
        cells = np.sort(cells)
        if len(cells) > 1 and not (cells[1:] > cells[:-1]).all():
            raise TokenizerError("tokenizer vocab lists a cell twice")
        coverage = d.get("coverage", {})
        return cls(config, cells, coverage if isinstance(coverage, dict) else {})


@functools.lru_cache(maxsize=512)
def _zone(name: str) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):  # a zone the lookup knows and tzdata does not
        return zoneinfo.ZoneInfo("UTC")


def choose_resolution(trajectories, seconds: float = 60.0, min_speed_mps: float = 0.5) -> tuple[int, str]:
    """The H3 resolution for data that has no stated one, and why: the one whose neighbouring cells are
    closest (on a log scale) to how far the data's median moving fix travels in ``seconds``, so that a
    token is about a minute of motion, whatever moves (a walker: ~10, a car or ship: ~8, an aircraft: 5).
    Fixes slower than ``min_speed_mps`` (standing still) do not count."""
    speeds = []
    for tr in trajectories:
        if len(tr) > 1:
            v = haversine_m(tr.lat[:-1], tr.lon[:-1], tr.lat[1:], tr.lon[1:]) / np.maximum(np.diff(tr.t), 1e-3)
            speeds.append(v[v >= min_speed_mps])
    moving = np.concatenate(speeds) if speeds else np.zeros(0)
    if len(moving) < 10:
        res = TokenizerConfig.resolution
        return res, f"resolution {res}, the default: too few moving fixes ({len(moving)}) to choose from"
    speed = float(np.median(moving))
    reach = speed * seconds
    # centre to centre of neighbouring hexagons: sqrt(3) edge lengths
    spacing = {r: 3 ** 0.5 * h3.average_hexagon_edge_length(r, unit="m") for r in RESOLUTIONS}
    res = min(RESOLUTIONS, key=lambda r: abs(np.log(spacing[r] / reach)))
    return res, (f"resolution {res}: the median moving fix goes {speed:.1f} m/s, {reach:,.0f} m a minute, and"
                 f" neighbouring res-{res} cells are {spacing[res]:,.0f} m apart")


def _is_cell(text: str) -> bool:
    try:
        return h3.is_valid_cell(text)
    except (h3.H3BaseException, ValueError, TypeError):
        return False
