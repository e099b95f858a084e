"""The models a backend serves: ONNX sessions and tokenizers, cached in memory per backend and in files
under the server's data directory, all keyed by content digests.

A model version is handed over from SQL (pgtraj._resolve) as a Ref: its id, the kind and sha256 of the
graph wanted, and the sha256 of the model's tokenizer and config as pgtraj._model_doc serialises them
(model_registry.meta_sha256). Everything cached is named by those digests and checked against them when
read, so nothing cached can be served for another model, another version, an edited row or another
database of the cluster, and no caller-chosen text ever becomes part of a file path.

Lookup order: this backend's memory (an LRU of models), the file cache (``<data dir>/pgtraj_cache/
<sha256>.onnx`` and ``<meta sha256>.meta``, written when a model is registered or first used), then the
registry tables, which only a backend outside parallel mode may query.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass

from pgtraj.core.contract import GRAPHS
from pgtraj.runtime.server import InferenceError, data_directory, in_parallel_mode

# least recently used dropped first: a backend serving more models than this reloads them from files
MODELS_PER_BACKEND = 16   # tokenizer + config (shared by versions trained with the same ones)
SESSIONS_PER_BACKEND = 32  # onnxruntime sessions: one per graph and thread count
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Ref:
    """A model version as the SQL wrappers resolved it, checked: these arguments of the internal
    functions can be called with anything."""

    model_id: int
    kind: str
    sha256: str
    meta_sha256: str
    threads: int

    def __post_init__(self):
        if not isinstance(self.model_id, int) or self.model_id < 1:
            raise InferenceError(f"invalid model id {self.model_id!r}", sqlstate="22023")
        if self.kind not in GRAPHS:
            raise InferenceError(f"invalid graph kind {self.kind!r}", sqlstate="22023")
        for what in ("sha256", "meta_sha256"):
            if not isinstance(getattr(self, what), str) or not _HEX64.match(getattr(self, what)):
                raise InferenceError(f"{what} must be 64 hexadecimal digits, not {getattr(self, what)!r}",
                                     sqlstate="22023", hint="the internal functions take what pgtraj._resolve returns")
        if not isinstance(self.threads, int) or not 1 <= self.threads <= 64:
            raise InferenceError(f"threads must be 1 to 64, not {self.threads!r}", sqlstate="22023",
                                 hint="SET pgtraj.threads = 1")

    @classmethod
    def of(cls, m: dict | None, kind: str | tuple[str, ...]) -> "Ref":
        """The Ref of a pgtraj.model_ref value (a dict in PL/Python) resolved for a graph of ``kind`` (or
        of one of several kinds: the first is what _resolve asks for, the others what it falls back to)."""
        kinds = (kind,) if isinstance(kind, str) else kind
        if m is None or m.get("kind") not in kinds:
            raise InferenceError(f"expected a model resolved for its {kinds[0]} graph, got"
                                 f" {None if m is None else m.get('kind')!r}", sqlstate="22023",
                                 hint=f"pass pgtraj._resolve(model, '{kinds[0]}')")
        return cls(m["model_id"], m["kind"], m["sha256"], m["meta_sha256"], m["threads"])


class Model:
    """A model configuration (tokenizer + config) as this backend holds it."""

    def __init__(self, doc: dict):
        from pgtraj.core.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.from_json(doc["tokenizer"])
        self.max_len = int(doc["config"].get("train", {}).get("max_len", 128))
        self.classes = doc["config"].get("classes") or []  # labels of a classify graph's outputs
        self._neighbours = None

    def neighbours(self):
        if self._neighbours is None:
            self._neighbours = self.tokenizer.neighbour_table()
        return self._neighbours


_tokenizers: OrderedDict[str, object] = OrderedDict()               # sha256 of a tokenizer's JSON -> Tokenizer
_models: OrderedDict[str, Model] = OrderedDict()                  # meta sha256 -> model
_sessions: OrderedDict[tuple[str, int], object] = OrderedDict()    # (graph sha256, threads) -> session
_names: dict[int, tuple[str, int]] = {}
loads = {"models": 0, "sessions": 0}  # what this backend had to load (pgtraj.runtime_info shows it)
_plans: dict = {}


def tokenizer(text: str):
    """A tokenizer given as JSON (pgtraj.tokenize, the graph check), parsed once per backend: parsing a
    large vocabulary per call would dominate the cost of tokenizing one trajectory."""
    from pgtraj.core.tokenizer import Tokenizer

    key = hashlib.sha256(text.encode()).hexdigest()
    tok = _tokenizers.get(key)
    if tok is None:
        if len(_tokenizers) >= MODELS_PER_BACKEND:
            _tokenizers.popitem(last=False)
        tok = _tokenizers[key] = Tokenizer.from_json(text)
    _tokenizers.move_to_end(key)
    return tok


def _plan(plpy, key: str, query: str, types: list[str]):
    if key not in _plans:
        _plans[key] = plpy.prepare(query, types)
    return _plans[key]


def name_version(plpy, model_id: int) -> tuple[str, int] | None:
    """The registered name and version of a model id, or None where it cannot be looked up (a parallel
    worker may not query)."""
    if model_id not in _names:
        if plpy is None or in_parallel_mode():
            return None
        rows = plpy.execute(_plan(plpy, "label", "SELECT name, version FROM pgtraj.model_registry WHERE id = $1",
                                  ["int8"]), [model_id])
        if not rows.nrows():
            return None
        _names[model_id] = (rows[0]["name"], rows[0]["version"])
    return _names[model_id]


def label(plpy, model_id: int) -> str:
    """'"name" v3' for messages, or 'model id 7' where the name cannot be looked up."""
    nv = name_version(plpy, model_id)
    return f'"{nv[0]}" v{nv[1]}' if nv else f"model id {model_id}"


# --- the file cache ------------------------------------------------------------------------------------

def cache_dir() -> str:
    return os.path.join(data_directory(), "pgtraj_cache")


def _write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def store(name: str, data: bytes) -> None:
    """Keep ``data`` in the file cache as ``name`` (best effort: a read-only or full disk only means a
    parallel worker cannot load a model no backend has used yet)."""
    try:
        os.makedirs(cache_dir(), mode=0o700, exist_ok=True)
        path = os.path.join(cache_dir(), name)
        if not os.path.exists(path):
            _write_atomic(path, data)
    except OSError:
        pass


def fetch(sha: str, suffix: str) -> bytes | None:
    """The cached bytes whose sha256 is ``sha``, or None (missing, unreadable or not matching)."""
    try:
        with open(os.path.join(cache_dir(), sha + suffix), "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == sha else None


def _not_loadable(plpy, ref: Ref) -> InferenceError:
    return InferenceError(f"{label(plpy, ref.model_id)} is not loaded in this server process and cannot be fetched"
                          " inside a parallel query", sqlstate="55000",
                          hint="run SELECT pgtraj.warmup('<model>') once (it writes the server's model files),"
                               " or SET max_parallel_workers_per_gather = 0")


def _doc(plpy, ref: Ref) -> bytes:
    raw = fetch(ref.meta_sha256, ".meta")
    if raw is None:
        if in_parallel_mode():
            raise _not_loadable(plpy, ref)
        rows = plpy.execute(_plan(plpy, "doc", "SELECT pgtraj._model_doc(tokenizer, config) AS doc FROM"
                                  " pgtraj.model_registry WHERE id = $1 AND meta_sha256 = $2", ["int8", "text"]),
                            [ref.model_id, ref.meta_sha256])
        if not rows.nrows():
            raise InferenceError(f"model id {ref.model_id} with tokenizer digest {ref.meta_sha256[:12]}... is not"
                                 " registered", sqlstate="22023",
                                 hint="the internal functions take what pgtraj._resolve returns")
        raw = bytes(rows[0]["doc"])
        store(ref.meta_sha256 + ".meta", raw)
    return raw


def _graph(plpy, ref: Ref) -> bytes:
    data = fetch(ref.sha256, ".onnx")
    if data is None:
        if in_parallel_mode():
            raise _not_loadable(plpy, ref)
        rows = plpy.execute(_plan(plpy, "graph", """
            SELECT a.bytes FROM pgtraj.model_artifacts a JOIN pgtraj.model_registry m ON m.id = a.model_id
             WHERE a.model_id = $1 AND a.kind = $2 AND a.sha256 = $3 AND m.meta_sha256 = $4""",
                                  ["int8", "text", "text", "text"]),
                            [ref.model_id, ref.kind, ref.sha256, ref.meta_sha256])
        if not rows.nrows():
            raise InferenceError(f"{label(plpy, ref.model_id)} has no {ref.kind} graph with sha256"
                                 f" {ref.sha256[:12]}...", sqlstate="22023",
                                 hint="the internal functions take what pgtraj._resolve returns")
        data = bytes(rows[0]["bytes"])
        store(ref.sha256 + ".onnx", data)
    return data


def model(plpy, ref: Ref) -> Model:
    m = _models.get(ref.meta_sha256)
    if m is None:
        raw = _doc(plpy, ref)
        m = Model(json.loads(raw[1:].decode()))  # jsonb_send: a version byte, then the JSON text
        if len(_models) >= MODELS_PER_BACKEND:
            _models.popitem(last=False)
        _models[ref.meta_sha256] = m
        loads["models"] += 1
    _models.move_to_end(ref.meta_sha256)
    return m


def session(plpy, ref: Ref) -> tuple[Model, object]:
    """The model and the onnxruntime session of graph ``ref.kind`` with ``ref.threads`` intra-op threads."""
    m = model(plpy, ref)
    key = (ref.sha256, ref.threads)
    sess = _sessions.get(key)
    if sess is None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = ref.threads, 1
        sess = ort.InferenceSession(_graph(plpy, ref), opts, providers=["CPUExecutionProvider"])
        if len(_sessions) >= SESSIONS_PER_BACKEND:
            _sessions.popitem(last=False)
        _sessions[key] = sess
        loads["sessions"] += 1
    _sessions.move_to_end(key)
    return m, sess


def warmup(plpy, ref: Ref) -> dict:
    """Load every graph of a model into this backend and its files into the server's cache."""
    model_id, meta_sha256, threads = ref.model_id, ref.meta_sha256, ref.threads
    t0 = time.perf_counter()
    # the weights are for fine-tuning, never served
    rows = plpy.execute(_plan(plpy, "graphs", "SELECT kind, sha256 FROM pgtraj.model_artifacts WHERE model_id = $1"
                              " AND kind OPERATOR(pg_catalog.<>) 'weights' ORDER BY kind", ["int8"]), [model_id])
    for r in rows:
        m, _ = session(plpy, Ref(model_id, r["kind"], r["sha256"], meta_sha256, threads))
        if r["kind"] == "next_cell":  # constrained decoding's table: built once per backend, not in a query
            m.neighbours()
    name, version = name_version(plpy, model_id)
    return {"model": name, "version": version, "model_id": model_id,
            "graphs": [r["kind"] for r in rows], "threads": threads, "seconds": round(time.perf_counter() - t0, 4)}
