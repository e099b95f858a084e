"""What a graph must be before the registry stores it: an ONNX model that onnxruntime loads from its own
bytes, that reads no file (no external data), uses no custom operator, and takes pgtraj's inputs and gives
the outputs of its kind.

Whoever serves a registered graph later may be a superuser's query or a pg_cron job: a graph whose
initializer names an external data file ("../../etc/passwd") would be read by onnxruntime as the server's
OS user, so the file references are found in the protobuf itself, before onnxruntime ever sees the bytes.
The runtime has no ``onnx`` package (numpy + onnxruntime + h3 only): the few fields that matter are read
from the protobuf wire format directly.
"""

from __future__ import annotations

import re

from pgtraj.core.contract import GRAPHS, INPUT_NAMES, LEGACY_INPUT_NAMES
from pgtraj.core.errors import PgtrajError
from pgtraj.runtime.server import InferenceError

# operator domains onnxruntime implements itself; anything else is a custom operator library
STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"}

# protobuf field numbers (onnx.proto3): which sub-messages may hold tensors, graphs or operator domains
_MODEL_GRAPH, _MODEL_OPSET, _MODEL_TRAINING, _MODEL_FUNCTIONS = 7, 8, 20, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE = 1, 5, 15
_NODE_ATTRIBUTE, _NODE_DOMAIN = 5, 7
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_OPSET_DOMAIN = 1
_FUNCTION_NODE, _FUNCTION_DOMAIN = 7, 10


class GraphError(PgtrajError, ValueError):
    """Bytes that are not a graph pgtraj may store."""


def _fields(buf: memoryview):
    """(field number, wire type, value) of one protobuf message: ints for varints and fixed widths,
    memoryviews for length-delimited fields."""
    i, n = 0, len(buf)

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            if i >= n or shift > 63:
                raise GraphError("not an ONNX model (truncated or malformed protobuf)")
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7

    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, varint()
        elif wire == 1 or wire == 5:
            width = 8 if wire == 1 else 4
            if i + width > n:
                raise GraphError("not an ONNX model (truncated protobuf)")
            yield field, wire, int.from_bytes(buf[i:i + width], "little")
            i += width
        elif wire == 2:
            length = varint()
            if i + length > n:
                raise GraphError("not an ONNX model (truncated protobuf)")
            yield field, wire, buf[i:i + length]
            i += length
        else:  # groups (3, 4) are not used by ONNX; anything else is not protobuf
            raise GraphError("not an ONNX model (unexpected protobuf wire type)")


def _text(v) -> str:
    return bytes(v).decode("utf-8", "replace")


def _tensor(buf, where: str) -> None:
    for f, w, v in _fields(buf):
        if (f == _TENSOR_DATA_LOCATION and w == 0 and v == 1) or (f == _TENSOR_EXTERNAL_DATA and w == 2):
            raise GraphError(f"{where} keeps its data in an external file",
                             hint="save the model with its weights inside: onnx.save_model(m, path,"
                                  " save_as_external_data=False)")


def _sparse(buf, where: str) -> None:
    for f, w, v in _fields(buf):
        if f in (_SPARSE_VALUES, _SPARSE_INDICES) and w == 2:
            _tensor(v, where)


def _graph(buf, domains: set, depth: int) -> None:
    if depth > 32:
        raise GraphError("graph nesting is too deep")
    for f, w, v in _fields(buf):
        if w != 2:
            continue
        if f == _GRAPH_INITIALIZER:
            _tensor(v, "an initializer")
        elif f == _GRAPH_SPARSE:
            _sparse(v, "a sparse initializer")
        elif f == _GRAPH_NODE:
            _node(v, domains, depth)


def _node(buf, domains: set, depth: int) -> None:
    for f, w, v in _fields(buf):
        if f == _NODE_DOMAIN and w == 2:
            domains.add(_text(v))
        elif f == _NODE_ATTRIBUTE and w == 2:
            for af, aw, av in _fields(v):
                if aw != 2:
                    continue
                if af in (_ATTR_T, _ATTR_TENSORS):
                    _tensor(av, "a node attribute")
                elif af in (_ATTR_SPARSE, _ATTR_SPARSES):
                    _sparse(av, "a node attribute")
                elif af in (_ATTR_G, _ATTR_GRAPHS):
                    _graph(av, domains, depth + 1)


def scan(data: bytes) -> None:
    """Raise GraphError if ``data`` is not an ONNX model that is safe to load: one with a graph, no tensor
    kept in an external file, and only standard operator domains (model-local functions may define their
    own, built from standard operators)."""
    buf = memoryview(data)
    domains, local, has_graph = set(), set(), False
    for f, w, v in _fields(buf):
        if w != 2:
            continue
        if f == _MODEL_GRAPH:
            has_graph = True
            _graph(v, domains, 0)
        elif f == _MODEL_TRAINING:  # TrainingInfoProto: its graphs (fields 1 and 2) may hold tensors too
            for tf, tw, tv in _fields(v):
                if tf in (1, 2) and tw == 2:
                    _graph(tv, domains, 1)
        elif f == _MODEL_OPSET:
            domains.update(_text(ov) for of, ow, ov in _fields(v) if of == _OPSET_DOMAIN and ow == 2)
        elif f == _MODEL_FUNCTIONS:
            for ff, fw, fv in _fields(v):
                if ff == _FUNCTION_DOMAIN and fw == 2:
                    local.add(_text(fv))
                elif ff == _FUNCTION_NODE and fw == 2:
                    _node(fv, domains, 1)
    if not has_graph:
        raise GraphError("not an ONNX model (no graph)")
    custom = sorted(domains - STANDARD_DOMAINS - local)
    if custom:
        raise GraphError(f"uses operators of custom domain(s) {custom}, which onnxruntime cannot run without"
                         " loading a library", hint="export with standard ONNX operators only")


def check(kind: str, data: bytes, vocab_size: int):
    """The onnxruntime session of a graph that can serve as ``kind`` under a vocabulary of ``vocab_size``;
    raise GraphError saying why not."""
    import onnxruntime as ort

    if kind not in GRAPHS:
        raise GraphError(f"unknown kind (known: {', '.join(sorted(GRAPHS))})")
    scan(data)
    opts = ort.SessionOptions()  # a check, not a session to serve: no optimisation passes or arenas to pay for
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.enable_cpu_mem_arena = opts.enable_mem_pattern = False
    opts.add_session_config_entry("session.disable_prepacking", "1")
    try:
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unparsable models
        raise GraphError(f"onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from None
    names = tuple(i.name for i in sess.get_inputs())
    if names not in (INPUT_NAMES, LEGACY_INPUT_NAMES):
        raise GraphError(f"inputs are {list(names)}, expected {list(INPUT_NAMES)}")
    outs, want = sess.get_outputs(), GRAPHS[kind].outputs
    if len(outs) != len(want):
        raise GraphError(f"{len(outs)} outputs, expected {len(want)}")
    for o, spec in zip(outs, want):
        if len(o.shape) != spec.rank:
            raise GraphError(f"output {o.name} has rank {len(o.shape)}, expected {spec.rank}")
        if spec.width == "V" and o.shape[-1] != vocab_size:
            raise GraphError(f"output {o.name} has width {o.shape[-1]}, the tokenizer has {vocab_size} tokens")
        if isinstance(spec.width, int) and o.shape[-1] != spec.width:
            raise GraphError(f"output {o.name} has width {o.shape[-1]}, expected {spec.width}")
    return sess


# a weights archive holds at most this many arrays and bytes (a 'large' model is ~40 M parameters)
MAX_WEIGHT_ARRAYS, MAX_WEIGHT_BYTES = 4096, 1 << 31
_WEIGHT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,199}$")


def check_weights(data: bytes) -> dict:
    """The arrays of a model's weights (kind 'weights', format 'npz'): a zip of .npy arrays with parameter
    names, numbers only. numpy reads it with pickling refused, so no stored object can run code."""
    import io
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
            if len(infos) > MAX_WEIGHT_ARRAYS or sum(i.file_size for i in infos) > MAX_WEIGHT_BYTES:
                raise GraphError(f"weights archive too large ({len(infos)} arrays)")
        arrays = dict(np.load(io.BytesIO(data), allow_pickle=False))
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise GraphError(f"weights are not a numpy .npz archive of arrays ({str(exc)[:120]})") from None
    for name, a in arrays.items():
        if not _WEIGHT_NAME.match(name) or not isinstance(a, np.ndarray) or a.dtype.kind not in "fiub":
            raise GraphError(f"weights member {name[:60]!r} is not a numeric parameter array")
    return arrays


def check_artifact(plpy, row: dict) -> None:
    """Trigger side of every INSERT or UPDATE of pgtraj.model_artifacts: the graph must fit its kind and its
    model's tokenizer (an encoder's output width is the model's embedding_dim, recorded if it was not), or
    the statement fails with 22023 naming the graph. Then it goes into the runtime's file cache. Weights
    (for fine-tuning; never served) must be an archive of numeric arrays, and stay out of the cache."""
    from pgtraj.runtime import models

    if row["kind"] == "weights":
        try:
            check_weights(row["bytes"])
        except GraphError as exc:
            raise InferenceError(f"weights: {exc.message}", sqlstate="22023",
                                 hint="store what pgtraj.learn.export.weights_npz writes") from None
        return

    reg = plpy.execute(plpy.prepare(
        "SELECT tokenizer::pg_catalog.text AS tokenizer, embedding_dim, meta_sha256,"
        " pgtraj._model_doc(tokenizer, config) AS doc FROM pgtraj.model_registry WHERE id = $1", ["int8"]),
        [row["model_id"]])[0]
    kind, data = row["kind"], row["bytes"]
    try:
        tok = models.tokenizer(reg["tokenizer"])
    except PgtrajError as exc:
        raise InferenceError(f"the tokenizer is not a pgtraj tokenizer: {exc.message}", sqlstate="22023",
                             hint=exc.hint) from None
    try:
        sess = check(kind, data, tok.vocab_size)
    except GraphError as exc:
        raise InferenceError(f"graph {kind!r}: {exc.message}", sqlstate="22023",
                             hint=exc.hint or "export with pgtraj.learn.export, or match its inputs"
                                              f" ({', '.join(INPUT_NAMES)}) and outputs") from None
    if kind == "encoder":
        width = sess.get_outputs()[0].shape[-1]
        width = width if isinstance(width, int) else None
        if reg["embedding_dim"] is None and width is not None:
            plpy.execute(plpy.prepare("UPDATE pgtraj.model_registry SET embedding_dim = $2 WHERE id = $1",
                                      ["int8", "int4"]), [row["model_id"], width])
        elif width is not None and reg["embedding_dim"] != width:
            raise InferenceError(f"embedding_dim is {reg['embedding_dim']} but the encoder graph outputs {width}"
                                 " dimensions", sqlstate="22023")
    del sess
    models.store(reg["meta_sha256"] + ".meta", bytes(reg["doc"]))
    models.store(row["sha256"] + ".onnx", data)
