"""Model inference inside PostgreSQL (numpy + onnxruntime + h3): what pgtraj.embed, pgtraj.predict_next,
pgtraj.score and friends run.

The SQL wrappers resolve a model name to (model id, graph sha256) in plain SQL (pgtraj._resolve), so a
redeploy is seen by every backend at its next call, and pass them in. This module never queries on its hot
path: parallel workers may not run queries from PL/Python (each opens a subtransaction). It keeps, per
backend, the model's tokenizer and ONNX sessions keyed by graph sha256 and thread count (``SET
pgtraj.threads = n``, default 1: parallel query already spreads work over processes). A backend that
lacks a model loads it from the server's file mirror (CACHE_DIR: ``<sha256>.onnx``, ``model-<id>.json``,
written when a model is registered, warmed up or first used outside parallel mode), and otherwise from
the registry tables.

``plpy`` is passed in by the SQL wrappers (it only exists inside PL/Python).
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from ..errors import PgtrajError
from ..features import Inputs, collate, to_inputs
from ..tokenizer import SPECIAL_TOKENS, Tokenizer
from ..trajectory import from_wkb

INPUT_NAMES = ("tokens", "dow", "minute", "cont")
# Padded tokens per ONNX call. On CPU, 256 to 1,024 run equally fast; larger ones pad more: 4,096 cost 20%
# more on 500 mixed GeoLife trips, a fixed 256 rows 2.4x the padding (benchmarks/sql_inference.py).
BATCH_TOKENS = 1024
BATCH_ROWS = 256


class InferenceError(PgtrajError):
    """An inference call that cannot be served; ``sqlstate`` is what the SQL wrapper raises."""

    def __init__(self, message: str, *, sqlstate: str, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.sqlstate = sqlstate


class Model:
    """One registered model version as this backend holds it."""

    def __init__(self, model_id: int, meta: dict):
        self.id, self.name, self.version = model_id, meta["name"], meta["version"]
        self.tokenizer = Tokenizer.from_json(meta["tokenizer"])
        self.max_len = int(meta["config"].get("train", {}).get("max_len", 128))
        self.sessions: dict[str, tuple[str, int, object]] = {}  # kind -> (sha256, threads, session)
        self._neighbours = None

    @property
    def label(self) -> str:
        return f'"{self.name}" v{self.version}'

    def neighbours(self) -> np.ndarray:
        if self._neighbours is None:
            self._neighbours = self.tokenizer.neighbour_table()
        return self._neighbours


_models: dict[int, Model] = {}
_plans: dict = {}


def in_parallel_mode() -> bool:
    """Whether this backend is inside a parallel operation (a worker, or the leader under Gather)."""
    import ctypes

    fn = ctypes.CDLL(None).IsInParallelMode  # the server's own symbol
    fn.restype = ctypes.c_bool
    return bool(fn())


def _cache_dir() -> str | None:
    from . import CACHE_DIR

    return CACHE_DIR


def _write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def mirror(model_id: int, meta: dict | None, graphs: dict[str, bytes]) -> None:
    """Write a model's metadata and graphs to the file mirror (best effort: a read-only or full disk only
    means parallel workers cannot load a model no backend has used yet)."""
    d = _cache_dir()
    if not d:
        return
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        if meta is not None:
            _write_atomic(os.path.join(d, f"model-{model_id}.json"), json.dumps(meta).encode())
        for sha, data in graphs.items():
            path = os.path.join(d, f"{sha}.onnx")
            if not os.path.exists(path):
                _write_atomic(path, data)
    except OSError:
        pass


def _read_file(name: str) -> bytes | None:
    d = _cache_dir()
    try:
        with open(os.path.join(d, name), "rb") as f:
            return f.read()
    except (OSError, TypeError):
        return None


def _plan(plpy, key: str, query: str, types: list[str]):
    if key not in _plans:
        _plans[key] = plpy.prepare(query, types)
    return _plans[key]


def _not_loadable(what: str) -> InferenceError:
    return InferenceError(f"{what} is not loaded in this server process and cannot be fetched inside a"
                          " parallel query", sqlstate="55000",
                          hint="run SELECT pgtraj.warmup('<model>') once (it writes the server's model files),"
                               " or SET max_parallel_workers_per_gather = 0")


def _model(plpy, model_id: int) -> Model:
    model = _models.get(model_id)
    if model is not None:
        return model
    raw = _read_file(f"model-{model_id}.json")
    if raw is None:
        if in_parallel_mode():
            raise _not_loadable(f"model id {model_id}")
        row = plpy.execute(_plan(plpy, "model", """
            SELECT name, version, tokenizer::text AS tokenizer, config::text AS config
              FROM pgtraj.model_registry WHERE id = $1""", ["int8"]), [model_id])[0]
        meta = {"name": row["name"], "version": row["version"], "tokenizer": row["tokenizer"],
                "config": json.loads(row["config"])}
        mirror(model_id, meta, {})
    else:
        meta = json.loads(raw)
    if len(_models) >= 8:  # a backend rarely serves many models; drop them all rather than track use
        _models.clear()
    model = _models[model_id] = Model(model_id, meta)
    return model


def session(plpy, model_id: int, kind: str, sha: str, threads: str | None) -> tuple[Model, object]:
    """The model and its ONNX session for graph ``kind`` (sha256 ``sha``) with ``threads`` intra-op threads."""
    n = _threads(threads)
    model = _model(plpy, model_id)
    cached = model.sessions.get(kind)
    if cached is None or cached[0] != sha or cached[1] != n:
        import onnxruntime as ort

        data = _read_file(f"{sha}.onnx")
        if data is None:
            if in_parallel_mode():
                raise _not_loadable(f"model {model.label}")
            data = bytes(plpy.execute(_plan(plpy, "bytes", "SELECT bytes FROM pgtraj.model_artifacts WHERE"
                                            " model_id = $1 AND kind = $2", ["int8", "text"]),
                                      [model_id, kind])[0]["bytes"])
            mirror(model_id, None, {sha: data})
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = n, 1
        model.sessions[kind] = (sha, n, ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]))
    return model, model.sessions[kind][2]


def _threads(raw: str | None) -> int:
    if raw in (None, ""):
        return 1
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise InferenceError(f"pgtraj.threads must be an integer from 1 to 64, not {raw!r}", sqlstate="22023",
                             hint="SET pgtraj.threads = 1")
    return n


# --- encoding -------------------------------------------------------------------------------------------

def _read(tokenizer: Tokenizer, wkb, what: str):
    """One trajectory (parsed once) and its tokens; an unusable one raises InferenceError naming why
    (SQLSTATE 22023)."""
    try:
        traj = from_wkb(None, wkb)
        return traj, tokenizer.encode(traj)
    except PgtrajError as exc:
        raise InferenceError(f"{what}: {exc.message}", sqlstate="22023", hint=exc.hint) from None


def _encode(tokenizer: Tokenizer, wkb, what: str):
    """The tokens of one trajectory, as _read."""
    return _read(tokenizer, wkb, what)[1]


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

def embed_wkbs(tokenizer: Tokenizer, max_len: int, sess, wkbs: list, *,
               skip_errors: bool = False) -> tuple[list, dict]:
    """Unit-length embeddings (float32; None for None) of trajectories given as WKB, and {index:
    InferenceError} of those skipped as unusable (with ``skip_errors``; otherwise the first raises).

    A trip longer than the model's context is embedded window by window and the windows' embeddings
    averaged, then normalised. Pure: what the database runs, and what benchmarks/ runs outside it."""
    owner, seqs, errors = [], [], {}
    for i, wkb in enumerate(wkbs):
        if wkb is None:
            continue
        try:
            x = _encode(tokenizer, wkb, f"trajectory {i + 1}")
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
        (emb,) = _run(sess, [seqs[j] for j in idx])
        for j, e in zip(idx, emb):
            sums[owner[j]] = sums.get(owner[j], 0.0) + e.astype(np.float64)
    out = [(sums[i] / max(np.linalg.norm(sums[i]), 1e-12)).astype(np.float32) if i in sums else None
           for i in range(len(wkbs))]
    return out, errors


def embed_rows(plpy, wkbs: list, model_id: int, sha: str, threads: str | None = None, *,
               skip_errors: bool = False) -> tuple[Model, list, dict]:
    """The model, the embeddings (pgvector text; None for None) and the skipped rows, as embed_wkbs."""
    model, sess = session(plpy, model_id, "encoder", sha, threads)
    embs, errors = embed_wkbs(model.tokenizer, model.max_len, sess, wkbs, skip_errors=skip_errors)
    return model, [None if e is None else vector_text(e) for e in embs], errors


def embed_many(plpy, wkbs: list, model_id: int, sha: str, threads: str | None) -> list:
    return embed_rows(plpy, wkbs, model_id, sha, threads)[1]


# --- next location, surprise --------------------------------------------------------------------------------

def predict_next(plpy, wkb, model_id: int, sha: str, threads: str | None, k: int, constrained: bool) -> list[tuple]:
    """Rows (rank, h3 cell, lat, lon, probability, expected seconds) of the ``k`` likeliest next cells.

    ``constrained``: the cells next to the current one on the H3 grid come first (a contiguous trip moves
    to a neighbour), ranked by the model; other cells follow. Probabilities are the model's own."""
    if k < 1:
        raise InferenceError(f"k must be at least 1, not {k}", sqlstate="22023")
    model, sess = session(plpy, model_id, "next_cell", sha, threads)
    x = _encode(model.tokenizer, wkb, "trajectory")
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


def _cell_rows(model: Model, p: np.ndarray, order: np.ndarray, k: int) -> list[tuple]:
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


def predict_destination(plpy, wkb, model_id: int, sha: str, threads: str | None, k: int) -> list[tuple]:
    """Rows (rank, cell, lat, lon, probability) of the ``k`` likeliest last cells of the trip."""
    if k < 1:
        raise InferenceError(f"k must be at least 1, not {k}", sqlstate="22023")
    model, sess = session(plpy, model_id, "destination", sha, threads)
    x = _encode(model.tokenizer, wkb, "trajectory")
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


def predict_path(plpy, wkb, model_id: int, sha: str, threads: str | None, steps: int, beam: int) -> list[tuple]:
    """The likeliest continuation of a trip by beam search over grid-neighbour moves: rows (step, cell, lat,
    lon, epoch seconds, probability of the step), step 0 being where the trip is now (its last fix)."""
    import h3

    if not 1 <= steps <= 100 or not 1 <= beam <= 16:
        raise InferenceError(f"steps must be 1..100 and beam 1..16 (got {steps}, {beam})", sqlstate="22023")
    model, sess = session(plpy, model_id, "next_cell", sha, threads)
    traj, x = _read(model.tokenizer, wkb, "trajectory")
    beams = [(0.0, x, [])]  # (log probability, tokens so far, step probabilities)
    for _ in range(steps):
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


def fill_gaps(plpy, wkb, model_id: int, sha: str, threads: str | None) -> list[tuple]:
    """The trip's fixes plus, for every cell it skipped (the tokenizer's grid-path interpolation, where
    fixes are too sparse to see each cell), the model's recovery of that cell: rows (lat, lon, epoch
    seconds, filled, probability). The skipped cells are masked and read bidirectionally, as in masked
    span pretraining, instead of being drawn on the straight line between fixes. A recovered cell further
    off the straight path than the gap is long cannot be right: the path's cell is kept (probability NULL)."""
    import h3

    from ..tokenizer import MASK

    model, sess = session(plpy, model_id, "masked", sha, threads)
    traj, x = _read(model.tokenizer, wkb, "trajectory")
    rows = [(float(a), float(o), float(t), False, None) for a, o, t in zip(traj.lat, traj.lon, traj.t)]
    inp = to_inputs(x)
    gaps = np.flatnonzero(x.interpolated) + 1  # +1: the BOS position
    for start in range(0, len(inp.tokens), model.max_len):
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


def score(plpy, wkb, model_id: int, sha: str, threads: str | None) -> float:
    """Mean surprise, -log p(next cell | the trip so far), over the trip's transitions (nats per cell):
    high for trips unlike anything the model learnt (anomaly detection). Long trips are scored window by
    window, each window read from its own start."""
    model, sess = session(plpy, model_id, "token_nll", sha, threads)
    x = _encode(model.tokenizer, wkb, "trajectory")
    total, count = 0.0, 0
    for w in windows(to_inputs(x), model.max_len):
        if len(w.tokens) < 2:
            continue
        (nll,) = _run(sess, [w])
        total += float(nll[0, : len(w.tokens) - 1].sum())
        count += len(w.tokens) - 1
    if count == 0:
        raise InferenceError("trajectory: too short to score (one cell, nothing to predict)", sqlstate="22023",
                             hint="score trips that cross at least two H3 cells")
    return total / count


def warmup(plpy, model_id: int, threads: str | None) -> dict:
    """Load every graph of a model into this backend and its files into the server's mirror."""
    import time

    t0 = time.perf_counter()
    rows = plpy.execute(_plan(plpy, "graphs", "SELECT kind, sha256 FROM pgtraj.model_artifacts WHERE model_id = $1"
                              " ORDER BY kind", ["int8"]), [model_id])
    for r in rows:
        model, _ = session(plpy, model_id, r["kind"], r["sha256"], threads)
        if r["kind"] == "next_cell":
            model.neighbours()  # constrained decoding's table: built once per backend, here rather than in a query
    return {"model": model.name, "version": model.version, "model_id": model_id, "graphs": [r["kind"] for r in rows],
            "threads": _threads(threads), "seconds": round(time.perf_counter() - t0, 4)}


def mirror_artifact(plpy, model_id: int, sha: str, data: bytes) -> None:
    """Trigger side of registration: mirror a new graph (and its model's metadata) to files."""
    row = plpy.execute(_plan(plpy, "model", """
        SELECT name, version, tokenizer::text AS tokenizer, config::text AS config
          FROM pgtraj.model_registry WHERE id = $1""", ["int8"]), [model_id])[0]
    mirror(model_id, {"name": row["name"], "version": row["version"], "tokenizer": row["tokenizer"],
                      "config": json.loads(row["config"])}, {sha: bytes(data)})


# what each graph kind must output: (name, rank, width) with width 'V' = vocabulary size, None = any
GRAPH_OUTPUTS = {"encoder": [(2, None)], "next_cell": [(2, "V"), (1, None)], "token_nll": [(2, None)],
                 "destination": [(2, "V")], "travel_time": [(1, None)], "classify": [(2, None)],
                 "masked": [(2, None), (2, None)]}


def check_graph(kind: str, data: bytes, vocab_size: int) -> str | None:
    """Why an ONNX graph cannot serve as ``kind`` under a vocabulary of ``vocab_size``, or None if it can."""
    import onnxruntime as ort

    if kind not in GRAPH_OUTPUTS:
        return f"unknown kind (known: {', '.join(sorted(GRAPH_OUTPUTS))})"
    try:
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unparsable models
        return f"onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})"
    names = [i.name for i in sess.get_inputs()]
    if names != list(INPUT_NAMES):
        return f"inputs are {names}, expected {list(INPUT_NAMES)}"
    outs = sess.get_outputs()
    want = GRAPH_OUTPUTS[kind]
    if len(outs) != len(want):
        return f"{len(outs)} outputs, expected {len(want)}"
    for o, (rank, width) in zip(outs, want):
        if len(o.shape) != rank:
            return f"output {o.name} has rank {len(o.shape)}, expected {rank}"
        if width == "V" and o.shape[-1] != vocab_size:
            return f"output {o.name} has width {o.shape[-1]}, the tokenizer has {vocab_size} tokens"
    return None


def output_width(data: bytes) -> int | None:
    import onnxruntime as ort

    width = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).get_outputs()[0].shape[-1]
    return width if isinstance(width, int) else None


def call(plpy, fn, *args, **kwargs):
    """Entry point of the SQL wrappers: run ``fn`` (a function of this module by name, or any callable
    taking plpy first) and turn pgtraj errors into SQL errors with SQLSTATE, message and hint (never a
    Python traceback, never a backend crash)."""
    try:
        return (globals()[fn] if isinstance(fn, str) else fn)(plpy, *args, **kwargs)
    except InferenceError as exc:
        plpy.error(f"pgtraj: {exc.message}", hint=exc.hint, sqlstate=exc.sqlstate)
    except PgtrajError as exc:
        plpy.error(f"pgtraj: {exc.message}", hint=exc.hint, sqlstate="22023")
