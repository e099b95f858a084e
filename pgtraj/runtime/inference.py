"""Model inference inside PostgreSQL (numpy + onnxruntime + h3): what pgtraj.embed, pgtraj.predict_next,
pgtraj.score and friends run.

The SQL wrappers resolve a model name (pgtraj._resolve) and pass a models.Ref in, so a redeploy is seen by
every backend at its next call; this module never queries on its hot path (parallel workers may not run
queries from PL/Python). Long loops serve a pending cancel or statement_timeout as they go
(server.check_interrupts), not only when the next query runs.

``plpy`` is passed in by the SQL wrappers (it only exists inside PL/Python); the benchmarks call the pure
functions (embed_wkbs) with None.
"""

from __future__ import annotations

import numpy as np

from ..errors import PgtrajError
from ..features import Inputs, collate, to_inputs
from ..tokenizer import SPECIAL_TOKENS, Tokenizer
from ..trajectory import check_time_order, from_wkb
from . import models
from .graphs import INPUT_NAMES
from .models import Ref
from .server import InferenceError, check_interrupts

# Padded tokens per ONNX call. On CPU, 256 to 1,024 run equally fast; larger ones pad more: 4,096 cost 20%
# more on 500 mixed GeoLife trips, a fixed 256 rows 2.4x the padding (benchmarks/sql_inference.py).
BATCH_TOKENS = 1024
BATCH_ROWS = 256


# --- encoding -------------------------------------------------------------------------------------------

def _read(tokenizer: Tokenizer, wkb, who=None, plpy=None):
    """One trajectory (parsed once) and its tokens. An unusable one raises InferenceError (SQLSTATE 22023)
    naming it (``who``: None, a row's key, or its place in an array) and the reason; so does any other
    failure on this input, whatever raised it, so that one bad row can always be set aside."""
    try:
        traj = check_time_order(from_wkb(who, wkb))
        return traj, tokenizer.encode(traj, check=lambda: check_interrupts(plpy))
    except PgtrajError as exc:
        raise InferenceError(exc.message, sqlstate="22023", hint=exc.hint) from None
    except (ArithmeticError, ValueError, TypeError, IndexError, KeyError, OSError) as exc:
        whom = "trajectory" if who is None else f"trajectory {who!r}"
        raise InferenceError(f"{whom} cannot be read: {type(exc).__name__}: {exc}", sqlstate="22023",
                             hint="check its coordinates and M values (epoch seconds)") from None


def _encode(tokenizer: Tokenizer, wkb, plpy=None):
    """The tokens of one trajectory, as _read."""
    return _read(tokenizer, wkb, None, plpy)[1]


def length_batches(lengths: list[int], max_tokens: int = BATCH_TOKENS, max_rows: int = BATCH_ROWS) -> list[list[int]]:
    """Indices grouped into ONNX calls of similar length: sorted, then cut where a batch padded to its longest
    member would pass ``max_tokens``. Many short sequences share a call; long ones do not drag short ones
    to their length."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > max_tokens or len(cur) == max_rows:
            out.append(cur)
            cur = []
        cur.append(i)
    return out + [cur] if cur else out


def _run(session, seqs: list) -> list[np.ndarray]:
    """One ONNX call over padded sequences (features.Inputs)."""
    b = collate(seqs)
    return session.run(None, {n: getattr(b, n) for n in INPUT_NAMES})


def windows(inp, max_len: int) -> list:
    """A sequence cut into consecutive windows of at most ``max_len`` (the model's context)."""
    n = len(inp.tokens)
    if n <= max_len:
        return [inp]
    return [inp.window(s, s + max_len) for s in range(0, n, max_len)]


def _tail(inp, max_len: int):
    return inp.window(max(len(inp.tokens) - max_len, 0), len(inp.tokens))


def vector_text(v: np.ndarray) -> str:
    """pgvector's text form; 9 significant digits round-trip float32 exactly."""
    return "[" + ",".join(format(float(x), ".9g") for x in v) + "]"


# --- embeddings -------------------------------------------------------------------------------------------

def embed_wkbs(tokenizer: Tokenizer, max_len: int, sess, wkbs: list, *, labels: list | None = None,
               skip_errors: bool = False, plpy=None) -> tuple[list, dict]:
    """Unit-length embeddings (float32; None for None) of trajectories given as WKB, and {index:
    InferenceError} of those skipped as unusable (with ``skip_errors``; otherwise the first raises).
    ``labels`` name the trajectories in messages (a row's key; by default their place, from 1).

    A trip longer than the model's context is embedded window by window and the windows' embeddings
    averaged, then normalised. Pure: what the database runs, and what benchmarks/ runs outside it."""
    owner, seqs, errors = [], [], {}
    for i, wkb in enumerate(wkbs):
        if wkb is None:
            continue
        try:
            x = _read(tokenizer, wkb, labels[i] if labels else i + 1, plpy)[1]
        except InferenceError as exc:
            if not skip_errors:
                raise
            errors[i] = exc
            continue
        for w in windows(to_inputs(x), max_len):
            owner.append(i)
            seqs.append(w)
    sums: dict[int, np.ndarray] = {}
    for idx in length_batches([len(s.tokens) for s in seqs]):
        check_interrupts(plpy)
        (emb,) = _run(sess, [seqs[j] for j in idx])
        for j, e in zip(idx, emb):
            sums[owner[j]] = sums.get(owner[j], 0.0) + e.astype(np.float64)
    out = [(sums[i] / max(np.linalg.norm(sums[i]), 1e-12)).astype(np.float32) if i in sums else None
           for i in range(len(wkbs))]
    return out, errors


def embed_rows(plpy, wkbs: list, ref: Ref, *, labels: list | None = None,
               skip_errors: bool = False) -> tuple[list, dict]:
    """The embeddings (pgvector text; None for None) and the skipped rows, as embed_wkbs."""
    model, sess = models.session(plpy, ref)
    embs, errors = embed_wkbs(model.tokenizer, model.max_len, sess, wkbs, labels=labels, skip_errors=skip_errors,
                              plpy=plpy)
    return [None if e is None else vector_text(e) for e in embs], errors


def embed_many(plpy, wkbs: list, ref: Ref) -> list:
    """pgtraj.embed: one trajectory, or an array of them named by their place in it."""
    return embed_rows(plpy, wkbs, ref, labels=None if len(wkbs) > 1 else [None])[0]


# --- next location, surprise --------------------------------------------------------------------------------

def predict_next(plpy, wkb, ref: Ref, k: int, constrained: bool) -> list[tuple]:
    """Rows (rank, h3 cell, lat, lon, probability, expected seconds) of the ``k`` likeliest next cells.

    ``constrained``: the cells next to the current one on the H3 grid come first (a contiguous trip moves
    to a neighbour), ranked by the model; other cells follow. Probabilities are the model's own."""
    if k < 1:
        raise InferenceError(f"k must be at least 1, not {k}", sqlstate="22023")
    model, sess = models.session(plpy, ref)
    x = _encode(model.tokenizer, wkb, plpy)
    probs, log1p_dt = _run(sess, [_tail(to_inputs(x), model.max_len)])
    p = probs[0].astype(np.float64)
    p[: len(SPECIAL_TOKENS)] = -1.0  # PAD/MASK/UNK/BOS/EOS are not places
    key = p.copy()
    if constrained:
        near = model.neighbours()[int(x.tokens[-1])]
        near = near[near >= len(SPECIAL_TOKENS)]
        key[near] += 2.0  # probabilities are <= 1: neighbours sort first, in the model's order
    seconds = float(np.expm1(log1p_dt[0]))
    return [row + (seconds,) for row in _cell_rows(model, p, np.argsort(-key, kind="stable"), k)]


def _cell_rows(model: models.Model, p: np.ndarray, order: np.ndarray, k: int) -> list[tuple]:
    """(rank, cell, lat, lon, probability) of the first ``k`` cell tokens of ``order``."""
    import h3

    rows = []
    for t in order:
        if len(rows) == k:
            break
        if t < len(SPECIAL_TOKENS):
            continue
        cell = h3.int_to_str(model.tokenizer.token_cell(int(t)))
        lat, lon = h3.cell_to_latlng(cell)
        rows.append((len(rows) + 1, cell, lat, lon, float(p[t])))
    return rows


def predict_destination(plpy, wkb, ref: Ref, k: int) -> list[tuple]:
    """Rows (rank, cell, lat, lon, probability) of the ``k`` likeliest last cells of the trip."""
    if k < 1:
        raise InferenceError(f"k must be at least 1, not {k}", sqlstate="22023")
    model, sess = models.session(plpy, ref)
    x = _encode(model.tokenizer, wkb, plpy)
    (probs,) = _run(sess, [_tail(to_inputs(x), model.max_len)])
    return _cell_rows(model, probs[0], np.argsort(-probs[0], kind="stable"), k)


def _extend(tok: Tokenizer, x, token: int, dt: float):
    """``x`` with one predicted token appended: entered ``dt`` seconds after the last one, at its cell's
    centre, moving from the previous centre (the features the tokenizer would have computed)."""
    import h3

    from ..tokenizer import Tokens
    from ..trajectory import bearing_deg, haversine_m

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
    traj, x = _read(model.tokenizer, wkb, None, plpy)
    beams = [(0.0, x, [])]  # (log probability, tokens so far, step probabilities)
    for _ in range(steps):
        check_interrupts(plpy)
        probs, log1p_dt = _run(sess, [_tail(to_inputs(b[1]), model.max_len) for b in beams])
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


# continuous feature columns that reveal where a masked token is (as objectives.MaskedSpans hides them)
_SPATIAL = [2, 3, 4, 5, 6]


def fill_gaps(plpy, wkb, ref: Ref) -> list[tuple]:
    """The trip's fixes plus, for every cell it skipped (the tokenizer's grid-path interpolation, where
    fixes are too sparse to see each cell), the model's recovery of that cell: rows (lat, lon, epoch
    seconds, filled, probability). The skipped cells are masked and read bidirectionally, as in masked
    span pretraining, instead of being drawn on the straight line between fixes. A recovered cell further
    off the straight path than the gap is long cannot be right: the path's cell is kept (probability NULL)."""
    import h3

    from ..tokenizer import MASK

    model, sess = models.session(plpy, ref)
    traj, x = _read(model.tokenizer, wkb, None, plpy)
    rows = [(float(a), float(o), float(t), False, None) for a, o, t in zip(traj.lat, traj.lon, traj.t)]
    inp = to_inputs(x)
    gaps = np.flatnonzero(x.interpolated) + 1  # +1: the BOS position
    for start in range(0, len(inp.tokens), model.max_len):
        check_interrupts(plpy)
        w = Inputs(*(getattr(inp, f)[start:start + model.max_len].copy() for f in INPUT_NAMES))
        here = gaps[(gaps >= start) & (gaps < start + model.max_len)] - start
        if not len(here):
            continue
        w.tokens[here] = MASK
        w.cont[np.ix_(here, _SPATIAL)] = 0.0
        token, prob = _run(sess, [w])
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


def score(plpy, wkb, ref: Ref) -> float:
    """Mean surprise, -log p(next cell | the trip so far), over the trip's cells (nats per cell): high for
    trips unlike anything the model learnt (anomaly detection). Long trips are scored window by window,
    each window read from its own start."""
    model, sess = models.session(plpy, ref)
    x = _encode(model.tokenizer, wkb, plpy)
    if len(x.tokens) < 2:
        raise InferenceError("trajectory: too short to score (one cell, nothing to predict)", sqlstate="22023",
                             hint="score trips that cross at least two H3 cells")
    total, count = 0.0, 0
    for w in windows(to_inputs(x), model.max_len):
        check_interrupts(plpy)
        if len(w.tokens) < 2:
            continue
        (nll,) = _run(sess, [w])
        total += float(nll[0, : len(w.tokens) - 1].sum())
        count += len(w.tokens) - 1
    return total / count
