"""Models from elsewhere: ``pgtraj.import_model`` (an archive from pgtraj.export_model) and
``pgtraj.import_onnx`` (graphs trained outside pgtraj). Both end in pgtraj._register, which checks every
graph (runtime/graphs.py) like any other registration: nothing enters the registry unchecked."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

from pgtraj.runtime.server import InferenceError

ARCHIVE_FORMAT = "pgtraj-model/1"
_REGISTER = ("SELECT model_id, version FROM pgtraj._register($1, $2, $3, $4, $5, $6, $7, $8, NULL, $9, $10, $11)",
             ["text", "text", "jsonb", "jsonb", "jsonb", "text", "bool", "int4", "text", "text[]", "bytea[]"])


def _register(plpy, name, objective, config, tokenizer, metrics, primary_metric, higher_is_better, embedding_dim,
              description, graphs: dict[str, bytes]):
    row = plpy.execute(plpy.prepare(*_REGISTER), [
        name, objective, json.dumps(config or {}), json.dumps(tokenizer), json.dumps(metrics or {}), primary_metric,
        higher_is_better, embedding_dim, description, list(graphs), list(graphs.values())])[0]
    return row["model_id"], row["version"]


def _decode(kind: str, text) -> bytes:
    if not isinstance(text, str):
        raise InferenceError(f"graph {kind!r} of the archive is not base64 text", sqlstate="22P02")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InferenceError(f"graph {kind!r} of the archive is not valid base64", sqlstate="22P02") from None


def import_model(plpy, archive: bytes | None, name: str | None, deploy: bool | None) -> list[tuple]:
    if archive is None:
        raise InferenceError("import_model() needs an archive, got NULL", sqlstate="22004")
    try:
        doc = json.loads(archive)
    except (ValueError, UnicodeDecodeError):
        raise InferenceError("not a pgtraj model archive (not UTF-8 JSON)", sqlstate="22P02",
                             hint="archives come from pgtraj.export_model('name')") from None
    if not isinstance(doc, dict) or doc.get("format") != ARCHIVE_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else None
        raise InferenceError(f"not a pgtraj model archive (format {got or 'missing'})", sqlstate="22P02",
                             hint="archives come from pgtraj.export_model('name')")
    artifacts = doc.get("artifacts")
    if not isinstance(artifacts, dict) or not artifacts:
        raise InferenceError("the archive holds no ONNX graph", sqlstate="22P02")
    graphs = {}
    for kind in list(artifacts):
        a = artifacts.pop(kind)  # decoded one by one, each base64 copy dropped as soon as it is decoded
        if not isinstance(a, dict):
            raise InferenceError(f"graph {kind!r} of the archive is malformed", sqlstate="22P02")
        data = _decode(kind, a.get("bytes"))
        if hashlib.sha256(data).hexdigest() != a.get("sha256"):
            raise InferenceError(f"graph {kind!r} of the archive does not match its sha256", sqlstate="XX001",
                                 hint="the archive was altered or truncated: export it again")
        graphs[kind] = data
    target = name or doc.get("name")
    description = (f"imported: {doc.get('name')} v{doc.get('version')} (pgtraj {doc.get('pgtraj')})"
                   + (f": {doc['description']}" if doc.get("description") else ""))
    model_id, version = _register(plpy, target, doc.get("objective"), doc.get("config"), doc.get("tokenizer"),
                                  doc.get("metrics"), doc.get("primary_metric"), doc.get("higher_is_better", True),
                                  doc.get("embedding_dim"), description, graphs)
    if deploy:
        plpy.execute(plpy.prepare("SELECT 1 FROM pgtraj.deploy($1, $2, 'imported')", ["text", "text"]),
                     [target, str(version)])
    return [(target, version, model_id)]


def import_onnx(plpy, name, objective, tokenizer, graphs, config, description) -> list[tuple]:
    if name is None or objective is None or tokenizer is None or graphs is None:
        raise InferenceError("import_onnx() needs a name, an objective, a tokenizer and graphs", sqlstate="22004")
    encoded = json.loads(graphs)
    if not isinstance(encoded, dict):
        raise InferenceError("graphs must be a JSON object of kind -> base64 ONNX bytes", sqlstate="22P02",
                             hint="jsonb_build_object('encoder', encode(pg_read_binary_file('/path/encoder.onnx'),"
                                  " 'base64'))")
    if not encoded:
        raise InferenceError("graphs is empty", sqlstate="22P02")
    decoded = {kind: _decode(kind, text) for kind, text in encoded.items()}
    model_id, version = _register(plpy, name, objective, json.loads(config or "{}"), json.loads(tokenizer), {}, None,
                                  True, None, description or "imported ONNX", decoded)
    return [(name, version, model_id)]
