"""The masked_logp graph (and masked, what models before it were registered with): pgtraj.fill_gaps and
fill_gaps_detail, the places a sparse trajectory skipped, recovered by a masked-span model."""

from __future__ import annotations

import h3.api.numpy_int as h3i
import numpy as np

from pgtraj.core.contract import INPUT_NAMES
from pgtraj.core.features import NO_MOVE, SPATIAL, Inputs, to_inputs
from pgtraj.core.gaps import expected_positions
from pgtraj.core.tokenizer import MASK
from pgtraj.runtime import models
from pgtraj.runtime.encoding import read, run
from pgtraj.runtime.models import Ref
from pgtraj.runtime.server import check_interrupts

KINDS = ("masked_logp", "masked")  # what pgtraj._resolve(model, 'masked_logp') may hand over


def fill_gaps(plpy, wkb, ref: Ref) -> list[tuple]:
    """The trip's fixes plus, for every cell it skipped (the tokenizer's grid-path interpolation, where
    fixes are too sparse to see each cell), the model's recovery of where it was: rows (lat, lon, epoch
    seconds, filled, probability). The skipped cells are masked and read bidirectionally, as in masked
    span pretraining, instead of being drawn on the straight line between fixes: each position of a run of
    them becomes its expected place over the contiguous grid paths between the cells seen on either side
    (core.gaps.expected_positions), with the probability of the cell it lies in. Where no path is searched
    (a run longer than core.gaps.MAX_STEPS), the straight path's cells stay (probability NULL). A masked
    graph (one cell per position) is served as before: a cell further off the straight path than the gap
    is long is replaced by the path's."""
    model, sess = models.session(plpy, ref)
    traj, x = read(model.tokenizer, wkb, None, plpy)
    rows = [(float(a), float(o), float(t), False, None) for a, o, t in zip(traj.lat, traj.lon, traj.t)]
    outputs = _masked_outputs(plpy, sess, to_inputs(x), np.flatnonzero(x.interpolated) + 1, model.max_len)
    if ref.kind == "masked":
        cells = _argmax_cells(model.tokenizer, x, outputs)
        filled = {i: (*h3i.cell_to_latlng(cell), p) for i, (cell, p) in cells.items()}
    else:
        filled = _expected_places(model.tokenizer, x, outputs)
    for i, (lat, lon, p) in sorted(filled.items()):
        rows.append((float(lat), float(lon), float(x.t[i]), True, p))
    rows.sort(key=lambda r: (r[2], r[3]))
    return rows


def _masked_outputs(plpy, sess, inp: Inputs, gaps: np.ndarray, max_len: int) -> dict[int, tuple]:
    """Per skipped token (index into the tokens): the graph's outputs at its position, every skipped cell
    of a window hidden at once as learn/tasks/masked_spans.hide_masked hides them in training."""
    out = {}
    for start in range(0, len(inp.tokens), max_len):
        check_interrupts(plpy)
        here = gaps[(gaps >= start) & (gaps < start + max_len)] - start
        if not len(here):
            continue
        w = Inputs(*(getattr(inp, f)[start:start + max_len].copy() for f in INPUT_NAMES))
        w.tokens[here] = MASK
        w.cont[np.ix_(here, SPATIAL)] = 0.0
        w.move[here] = NO_MOVE
        w.move[here[here + 1 < len(w.move)] + 1] = NO_MOVE
        result = run(sess, [w])
        for pos in here:
            out[start + pos - 1] = tuple(r[0, pos] for r in result)  # -1: the BOS position
    return out


def _expected_places(tok, x, logp: dict[int, tuple]) -> dict[int, tuple[float, float, float | None]]:
    """(lat, lon, probability) of each skipped cell's position: its run's expected places between the seen
    cells around it."""
    out = {}
    skipped = x.interpolated
    i = 0
    while i < len(skipped):
        if not skipped[i]:
            i += 1
            continue
        j = i
        while j < len(skipped) and skipped[j]:
            j += 1
        run_idx = np.arange(i, j)  # tokens i .. j-1 skipped, i-1 and j seen
        lp = np.stack([logp[k][0] for k in run_idx])
        found = expected_positions(int(x.cells[i - 1]), int(x.cells[j]), len(run_idx) + 1, tok.lookup, lp)
        if found is None:
            out.update({int(k): (*h3i.cell_to_latlng(int(x.cells[k])), None) for k in run_idx})
        else:
            out.update({int(k): (lat, lon, float(p)) for k, (lat, lon), p in zip(run_idx, *found)})
        i = j
    return out


def _argmax_cells(tok, x, outputs: dict[int, tuple]) -> dict[int, tuple[int, float | None]]:
    """A masked graph's cell at each position, kept only when reachable in time: no further off the
    straight path than the gap is long."""
    out = {}
    for i, (token, prob) in outputs.items():
        token_cell = tok.token_cell(int(token))
        line = int(x.cells[i])  # where the straight grid path puts it
        budget = int(min(i - _last_observed(x.interpolated, i), _next_observed(x.interpolated, i) - i))
        if _grid_distance(token_cell, line) > budget:
            out[i] = (line, None)
        else:
            out[i] = (token_cell, float(prob))
    return out


def _last_observed(interpolated: np.ndarray, i: int) -> int:
    obs = np.flatnonzero(~interpolated[:i])
    return int(obs[-1]) if len(obs) else 0


def _next_observed(interpolated: np.ndarray, i: int) -> int:
    obs = np.flatnonzero(~interpolated[i + 1:])
    return i + 1 + int(obs[0]) if len(obs) else len(interpolated) - 1


def _grid_distance(a: int, b: int) -> int:
    """Grid steps between two cells of any resolutions (compared at the coarser one); far when H3 has no
    path between them (pentagon distortion, other faces)."""
    ra, rb = h3i.get_resolution(a), h3i.get_resolution(b)
    r = min(ra, rb)
    try:
        return h3i.grid_distance(h3i.cell_to_parent(a, r) if ra > r else a, h3i.cell_to_parent(b, r) if rb > r else b)
    except Exception:  # h3 raises its own error types when no grid path exists
        return 1 << 30
