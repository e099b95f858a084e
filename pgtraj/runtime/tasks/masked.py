"""The masked graph: pgtraj.fill_gaps and fill_gaps_detail, the cells a sparse trajectory skipped,
recovered by a masked-span model."""

from __future__ import annotations

import numpy as np

from pgtraj.core.contract import INPUT_NAMES
from pgtraj.core.features import NO_MOVE, SPATIAL, Inputs, to_inputs
from pgtraj.runtime import models
from pgtraj.runtime.encoding import read, run
from pgtraj.runtime.models import Ref
from pgtraj.runtime.server import check_interrupts


def fill_gaps(plpy, wkb, ref: Ref) -> list[tuple]:
    """The trip's fixes plus, for every cell it skipped (the tokenizer's grid-path interpolation, where
    fixes are too sparse to see each cell), the model's recovery of that cell: rows (lat, lon, epoch
    seconds, filled, probability). The skipped cells are masked and read bidirectionally, as in masked
    span pretraining, instead of being drawn on the straight line between fixes. A recovered cell further
    off the straight path than the gap is long cannot be right: the path's cell is kept (probability NULL)."""
    import h3

    from pgtraj.core.tokenizer import MASK

    model, sess = models.session(plpy, ref)
    traj, x = read(model.tokenizer, wkb, None, plpy)
    rows = [(float(a), float(o), float(t), False, None) for a, o, t in zip(traj.lat, traj.lon, traj.t)]
    inp = to_inputs(x)
    gaps = np.flatnonzero(x.interpolated) + 1  # +1: the BOS position
    for start in range(0, len(inp.tokens), model.max_len):
        check_interrupts(plpy)
        w = Inputs(*(getattr(inp, f)[start:start + model.max_len].copy() for f in INPUT_NAMES))
        here = gaps[(gaps >= start) & (gaps < start + model.max_len)] - start
        if not len(here):
            continue
        # hidden as learn/tasks/masked_spans.hide_masked hides them in training
        w.tokens[here] = MASK
        w.cont[np.ix_(here, SPATIAL)] = 0.0
        w.move[here] = NO_MOVE
        w.move[here[here + 1 < len(w.move)] + 1] = NO_MOVE
        token, prob = run(sess, [w])
        for pos in here:
            i = start + pos - 1  # index into x
            cell = h3.int_to_str(model.tokenizer.token_cell(int(token[0, pos])))
            line = h3.int_to_str(int(x.cells[i]))  # where the straight grid path puts it
            # a recovered cell must be reachable in time: no further off the path than the gap is long
            budget = int(min(i - _last_observed(x.interpolated, i), _next_observed(x.interpolated, i) - i))
            if _grid_distance(h3, cell, line) > budget:
                cell, p = line, None
            else:
                p = float(prob[0, pos])
            lat, lon = h3.cell_to_latlng(cell)
            rows.append((lat, lon, float(x.t[i]), True, p))
    rows.sort(key=lambda r: (r[2], r[3]))
    return rows


def _last_observed(interpolated: np.ndarray, i: int) -> int:
    obs = np.flatnonzero(~interpolated[:i])
    return int(obs[-1]) if len(obs) else 0


def _next_observed(interpolated: np.ndarray, i: int) -> int:
    obs = np.flatnonzero(~interpolated[i + 1:])
    return i + 1 + int(obs[0]) if len(obs) else len(interpolated) - 1


def _grid_distance(h3, a: str, b: str) -> int:
    """Grid steps between two cells of any resolutions (compared at the coarser one); far when H3 has no
    path between them (pentagon distortion, other faces)."""
    ra, rb = h3.get_resolution(a), h3.get_resolution(b)
    r = min(ra, rb)
    try:
        return h3.grid_distance(h3.cell_to_parent(a, r) if ra > r else a, h3.cell_to_parent(b, r) if rb > r else b)
    except Exception:  # h3 raises its own error types when no grid path exists
        return 1 << 30
