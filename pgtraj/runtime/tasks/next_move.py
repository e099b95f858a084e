"""The next_move graph (and next_cell, what models of pgtraj 0.1 were registered with): pgtraj.predict_next
(the k likeliest next cells) and pgtraj.predict_path (the likeliest continuation, by beam search).

A next_move graph gives the probability of each of the last cell's grid neighbours, counted from straight
on in the frame core.tokenizer.move_frames defines, and of a jump: a prediction is always a cell next to
where the trip is, named at the tokenizer's resolution, in places the vocabulary never saw too. A next_cell
graph gives a distribution over the vocabulary; with ``constrained`` its grid neighbours come first.
"""

from __future__ import annotations

import numpy as np

from pgtraj.core.features import to_inputs
from pgtraj.core.tokenizer import N_SLOTS, SPECIAL_TOKENS, Tokenizer, Tokens, move_frames
from pgtraj.runtime import models
from pgtraj.runtime.encoding import cell_rows, coverage_notice, read, run, tail
from pgtraj.runtime.models import Ref
from pgtraj.runtime.server import InferenceError, check_interrupts

KINDS = ("next_move", "next_cell")  # what pgtraj._resolve(model, 'next_move') may hand over
BACK = 3                            # the move frame's slot of the cell the trip came from


def _frame(x: Tokens) -> np.ndarray:
    """The move frame of the trip's last cell: its grid neighbours, slot by slot."""
    return move_frames(x.cells[-2:])[-1]


def _seconds(log1p_dt) -> float:
    return max(0.0, float(np.expm1(log1p_dt)))


def predict_next(plpy, wkb, ref: Ref, k: int, constrained: bool) -> list[tuple]:
    """Rows (rank, h3 cell, lat, lon, probability, expected seconds) of the ``k`` likeliest next cells
    (at most the six grid neighbours for a next_move graph; a jump has no cell to name).

    The graph predicts when the trip will enter its next cell, whichever it is; each neighbour gets a share
    of that time in proportion to its centre's distance from the last fix (so the probability-weighted mean
    over the neighbours is the model's figure): a neighbour straight ahead of a trip near the cell's front
    edge is entered sooner than one behind it."""
    import h3

    from pgtraj.core.trajectory import haversine_m

    if k < 1:
        raise InferenceError(f"k must be at least 1, not {k}", sqlstate="22023")
    model, sess = models.session(plpy, ref)
    traj, x = read(model.tokenizer, wkb, None, plpy)
    coverage_notice(plpy, model, ref, x)
    probs, log1p_dt = run(sess, [tail(to_inputs(x), model.max_len)])
    seconds = _seconds(log1p_dt[0])
    if ref.kind == "next_cell":
        return [row + (seconds,) for row in _vocab_rows(model, x, probs[0], k, constrained)]
    frame, p = _frame(x), probs[0].astype(np.float64)
    slots = [s for s in range(N_SLOTS) if frame[s]]
    centre = np.array([h3.cell_to_latlng(h3.int_to_str(int(frame[s]))) for s in slots])
    dist = haversine_m(float(traj.lat[-1]), float(traj.lon[-1]), centre[:, 0], centre[:, 1])
    mean = float(np.sum(p[slots] * dist) / max(np.sum(p[slots]), 1e-12))
    share = dict(zip(slots, dist / max(mean, 1e-9)))
    rows = []
    for slot in np.argsort(-p[:N_SLOTS], kind="stable"):
        if len(rows) == k:
            break
        if frame[slot]:
            cell = h3.int_to_str(int(frame[slot]))
            rows.append((len(rows) + 1, cell, *h3.cell_to_latlng(cell), float(p[slot]), seconds * float(share[slot])))
    return rows


def _vocab_rows(model: models.Model, x: Tokens, probs: np.ndarray, k: int, constrained: bool) -> list[tuple]:
    p = probs.astype(np.float64)
    p[: len(SPECIAL_TOKENS)] = -1.0  # PAD/MASK/UNK/BOS/EOS are not places
    key = p.copy()
    if constrained:
        near = model.neighbours()[int(x.tokens[-1])]
        near = near[near >= len(SPECIAL_TOKENS)]
        key[near] += 2.0  # probabilities are <= 1: neighbours sort first, in the model's order
    return cell_rows(model, p, np.argsort(-key, kind="stable"), k)


def _steps(model: models.Model, kind: str, x: Tokens, p: np.ndarray) -> list[tuple[int, int, int, float]]:
    """The continuations a beam may take from ``x``: (cell, token, move, probability), never back to the
    cell the trip came from or staying put."""
    if kind == "next_cell":
        near = model.neighbours()[int(x.tokens[-1])]
        near = near[(near >= len(SPECIAL_TOKENS)) & (near != x.tokens[-1])]
        cand = near if len(near) else np.arange(len(SPECIAL_TOKENS), len(p))
        cells = [model.tokenizer.token_cell(int(t)) for t in cand]
        frame = _frame(x).tolist()
        back = int(x.cells[-2]) if len(x) > 1 else None
        return [(c, int(t), frame.index(c) if c in frame else N_SLOTS, float(p[t]))
                for c, t in zip(cells, cand) if c != back]
    frame = _frame(x)
    tokens = model.tokenizer.lookup(frame)
    return [(int(frame[s]), int(tokens[s]), s, float(p[s])) for s in range(N_SLOTS)
            if frame[s] and not (s == BACK and len(x) > 1)]


def _extend(tok: Tokenizer, x: Tokens, cell: int, token: int, move: int, dt: float) -> Tokens:
    """``x`` with one predicted cell appended: entered ``dt`` seconds after the last one, at its centre,
    moving from the previous centre (the features the tokenizer would have computed)."""
    import h3.api.numpy_int as h3i

    from pgtraj.core.trajectory import bearing_deg, haversine_m

    (la0, lo0), (la1, lo1) = h3i.cell_to_latlng(int(x.cells[-1])), h3i.cell_to_latlng(cell)
    t = float(x.t[-1]) + dt
    dow, minute = tok.local_time(np.array([t]), np.array([la1]), np.array([lo1]))
    a, b = (np.array([v]) for v in (la0, la1))
    dist = float(haversine_m(a, np.array([lo0]), b, np.array([lo1]))[0])
    new = dict(tokens=token, cells=cell, t=t, dwell=0.0, dt=dt, dow=dow, minute=minute, offset=np.zeros((1, 2)),
               speed=dist / max(dt, 1e-3), heading=float(bearing_deg(a, np.array([lo0]), b, np.array([lo1]))[0]),
               interpolated=False, move=move, alt=x.alt[-1])
    return Tokens(*(np.concatenate([getattr(x, f), np.asarray(new[f]).reshape((1,) + getattr(x, f).shape[1:])
                                    .astype(getattr(x, f).dtype)]) for f in Tokens.FIELDS))


# a predicted step takes at least this long: M keeps increasing along the predicted path
MIN_STEP_SECONDS = 1.0


def predict_path(plpy, wkb, ref: Ref, steps: int, beam: int) -> list[tuple]:
    """The likeliest continuation of a trip by beam search over grid-neighbour moves: rows (step, cell, lat,
    lon, epoch seconds, probability of the step), step 0 being where the trip is now (its last fix)."""
    import h3

    if not 1 <= steps <= 100 or not 1 <= beam <= 16:
        raise InferenceError(f"steps must be 1..100 and beam 1..16 (got {steps}, {beam})", sqlstate="22023")
    model, sess = models.session(plpy, ref)
    traj, x = read(model.tokenizer, wkb, None, plpy)
    coverage_notice(plpy, model, ref, x)
    beams = [(0.0, x, [])]  # (log probability, tokens so far, step probabilities)
    for _ in range(steps):
        check_interrupts(plpy)
        probs, log1p_dt = run(sess, [tail(to_inputs(b[1]), model.max_len) for b in beams])
        grown = []
        for (lp, bx, ps), p, ldt in zip(beams, probs, log1p_dt):
            dt = max(MIN_STEP_SECONDS, _seconds(ldt))
            for cell, token, move, pt in sorted(_steps(model, ref.kind, bx, p), key=lambda s: -s[3])[:beam]:
                grown.append((lp + float(np.log(max(pt, 1e-30))), bx, ps, cell, token, move, pt, dt))
        if not grown:
            break
        grown.sort(key=lambda g: -g[0])
        beams = [(lp, _extend(model.tokenizer, bx, cell, token, move, dt), ps + [pt])
                 for lp, bx, ps, cell, token, move, pt, dt in grown[:beam]]
    best = beams[0]
    n = len(x.tokens)
    rows = [(0, h3.int_to_str(int(x.cells[-1])), float(traj.lat[-1]), float(traj.lon[-1]), float(traj.t[-1]), 1.0)]
    for i in range(len(best[2])):
        cell = h3.int_to_str(int(best[1].cells[n + i]))
        lat, lon = h3.cell_to_latlng(cell)
        # times count from entering the last cell; the trip may already be later than that in it
        rows.append((i + 1, cell, lat, lon, max(float(best[1].t[n + i]), rows[-1][4] + MIN_STEP_SECONDS), best[2][i]))
    return rows
