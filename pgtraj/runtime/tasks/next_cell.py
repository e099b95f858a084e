"""The next_cell graph: pgtraj.predict_next (the k likeliest next cells) and pgtraj.predict_path (the
likeliest continuation, by beam search over grid-neighbour moves)."""

from __future__ import annotations

import numpy as np

from pgtraj.core.features import to_inputs
from pgtraj.core.tokenizer import SPECIAL_TOKENS, Tokenizer
from pgtraj.runtime import models
from pgtraj.runtime.encoding import cell_rows, encode, read, run, tail
from pgtraj.runtime.models import Ref
from pgtraj.runtime.server import InferenceError, check_interrupts


def predict_next(plpy, wkb, ref: Ref, k: int, constrained: bool) -> list[tuple]:
    """Rows (rank, h3 cell, lat, lon, probability, expected seconds) of the ``k`` likeliest next cells.

    ``constrained``: the cells next to the current one on the H3 grid come first (a contiguous trip moves
    to a neighbour), ranked by the model; other cells follow. Probabilities are the model's own."""
    if k < 1:
        raise InferenceError(f"k must be at least 1, not {k}", sqlstate="22023")
    model, sess = models.session(plpy, ref)
    x = encode(model.tokenizer, wkb, plpy)
    probs, log1p_dt = run(sess, [tail(to_inputs(x), model.max_len)])
    p = probs[0].astype(np.float64)
    p[: len(SPECIAL_TOKENS)] = -1.0  # PAD/MASK/UNK/BOS/EOS are not places
    key = p.copy()
    if constrained:
        near = model.neighbours()[int(x.tokens[-1])]
        near = near[near >= len(SPECIAL_TOKENS)]
        key[near] += 2.0  # probabilities are <= 1: neighbours sort first, in the model's order
    seconds = float(np.expm1(log1p_dt[0]))
    return [row + (seconds,) for row in cell_rows(model, p, np.argsort(-key, kind="stable"), k)]


def _extend(tok: Tokenizer, x, token: int, dt: float):
    """``x`` with one predicted token appended: entered ``dt`` seconds after the last one, at its cell's
    centre, moving from the previous centre (the features the tokenizer would have computed)."""
    import h3

    from pgtraj.core.tokenizer import Tokens
    from pgtraj.core.trajectory import bearing_deg, haversine_m

    cell = tok.token_cell(token)
    (la0, lo0), (la1, lo1) = h3.cell_to_latlng(h3.int_to_str(int(x.cells[-1]))), h3.cell_to_latlng(h3.int_to_str(cell))
    t = float(x.t[-1]) + dt
    local = t + tok._utc_offset_s(float(x.t[0]))
    days = np.floor(local / 86400.0)
    dist = float(haversine_m(np.array([la0]), np.array([lo0]), np.array([la1]), np.array([lo1]))[0])
    new = dict(tokens=token, cells=cell, t=t, dwell=0.0, dt=dt, dow=(days + 3) % 7,
               minute=np.floor((local - days * 86400.0) / 60.0), offset=np.zeros((1, 2)),
               speed=dist / max(dt, 1e-3),
               heading=float(bearing_deg(np.array([la0]), np.array([lo0]), np.array([la1]), np.array([lo1]))[0]),
               interpolated=False)
    return Tokens(*(np.concatenate([getattr(x, f), np.asarray(new[f]).reshape((1,) + getattr(x, f).shape[1:])
                                    .astype(getattr(x, f).dtype)]) for f in Tokens.FIELDS))


def predict_path(plpy, wkb, ref: Ref, steps: int, beam: int) -> list[tuple]:
    """The likeliest continuation of a trip by beam search over grid-neighbour moves: rows (step, cell, lat,
    lon, epoch seconds, probability of the step), step 0 being where the trip is now (its last fix)."""
    import h3

    if not 1 <= steps <= 100 or not 1 <= beam <= 16:
        raise InferenceError(f"steps must be 1..100 and beam 1..16 (got {steps}, {beam})", sqlstate="22023")
    model, sess = models.session(plpy, ref)
    traj, x = read(model.tokenizer, wkb, None, plpy)
    beams = [(0.0, x, [])]  # (log probability, tokens so far, step probabilities)
    for _ in range(steps):
        check_interrupts(plpy)
        probs, log1p_dt = run(sess, [tail(to_inputs(b[1]), model.max_len) for b in beams])
        grown = []
        for (lp, bx, ps), p, ldt in zip(beams, probs, log1p_dt):
            near = model.neighbours()[int(bx.tokens[-1])]
            near = near[(near >= len(SPECIAL_TOKENS)) & (near != bx.tokens[-1])]
            cand = near if len(near) else np.arange(len(SPECIAL_TOKENS), len(p))
            for t in cand[np.argsort(-p[cand], kind="stable")[:beam]]:
                grown.append((lp + float(np.log(max(p[t], 1e-30))), bx, ps, int(t), float(p[t]),
                              max(0.0, float(np.expm1(ldt)))))
        grown.sort(key=lambda g: -g[0])
        beams = [(lp, _extend(model.tokenizer, bx, t, dt), ps + [pt]) for lp, bx, ps, t, pt, dt in grown[:beam]]
    best = beams[0]
    n = len(x.tokens)
    rows = [(0, h3.int_to_str(int(x.cells[-1])), float(traj.lat[-1]), float(traj.lon[-1]), float(traj.t[-1]), 1.0)]
    for i in range(steps):
        cell = h3.int_to_str(int(best[1].cells[n + i]))
        lat, lon = h3.cell_to_latlng(cell)
        # times count from entering the last cell; the trip may already be later than that in it
        rows.append((i + 1, cell, lat, lon, max(float(best[1].t[n + i]), rows[-1][4]), best[2][i]))
    return rows
