"""Models between databases (export_model / import_model) and ONNX trained elsewhere (import_onnx)."""

from __future__ import annotations

import base64
import json

import psycopg
import pytest

from pgtraj.learn.export import export

from .test_embed_table import conn, fill  # noqa: F401  (fixtures: 40 trips, deployed model 'm')
from .test_inference import models, register  # noqa: F401
from .test_model import TOK, TRIPS, batch


def test_export_import_round_trip(conn, databases, installed_template):
    archive = conn.execute("SELECT pgtraj.export_model('m')").fetchone()[0]
    want = conn.execute("SELECT pgtraj.embed(geom, 'm')::text FROM trips WHERE id = 5").fetchone()[0]
    other = databases.create(installed_template)
    try:
        with psycopg.connect(databases.url(other), autocommit=True) as c:
            c.execute("CREATE TABLE trips (id int PRIMARY KEY, geom geometry(LineStringM, 4326))")
            fill(c, n=6)
            assert c.execute("SELECT * FROM pgtraj.import_model(%s, deploy => true)", [archive]).fetchone()[:2] == ("m", 1)
            assert c.execute("SELECT pgtraj.embed(geom, 'm')::text FROM trips WHERE id = 5").fetchone()[0] == want
            renamed = c.execute("SELECT model_name, version FROM pgtraj.import_model(%s, 'copy')", [archive]).fetchone()
            assert renamed == ("copy", 1)
            assert c.execute("SELECT description FROM pgtraj.models WHERE name = 'copy'").fetchone()[0].startswith(
                "imported: m v1")
            doc = json.loads(bytes(archive))
            doc["artifacts"]["encoder"]["bytes"] = base64.b64encode(b"tampered").decode()
            with pytest.raises(psycopg.errors.DataCorrupted):
                c.execute("SELECT * FROM pgtraj.import_model(%s)", [json.dumps(doc).encode()])
            with pytest.raises(psycopg.errors.InvalidTextRepresentation):
                c.execute("SELECT * FROM pgtraj.import_model(%s)", [b"\x00not json"])
            assert c.execute("SELECT count(*) FROM pgtraj.model_registry").fetchone() == (2,)  # failures left nothing
    finally:
        databases.drop(other)


def pickled() -> bytes:
    """An .npz whose member is a pickled object: loading it with pickles allowed could run code."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **{"backbone.tok.weight": np.array([{"x": 1}], dtype=object)})
    return buf.getvalue()


def test_import_onnx_checks_the_graphs(conn, models):  # noqa: F811
    enc = export(models[0], "encoder", batch(TRIPS[:2]))
    nxt = export(models[0], "next_cell", batch(TRIPS[:2]))
    b64 = lambda d: base64.b64encode(d).decode()  # noqa: E731
    ok = conn.execute("SELECT * FROM pgtraj.import_onnx('ext', 'external', %s, %s)",
                      [TOK.to_json(), json.dumps({"encoder": b64(enc), "next_cell": b64(nxt)})]).fetchone()
    assert ok[:2] == ("ext", 1)
    assert conn.execute("SELECT embedding_dim FROM pgtraj.models WHERE name = 'ext'").fetchone() == (32,)
    got = conn.execute("SELECT pgtraj.embed(geom, 'ext@1') = pgtraj.embed(geom, 'm') FROM trips WHERE id = 3").fetchone()
    assert got == (True,)
    for graphs, words in [({"encoder": b64(b"not onnx")}, "not an ONNX model"),
                          ({"encoder": b64(enc[: len(enc) // 2])}, "not an ONNX model (truncated"),
                          ({"encoder": b64(b"\x3a\x00")}, "onnxruntime cannot load it"),  # an empty graph
                          ({"next_cell": b64(enc)}, "outputs, expected 2"),
                          ({"encoder": b64(enc), "next_move": b64(nxt)}, "expected 7"),  # vocabulary-wide
                          ({"encoder": b64(enc), "weights": b64(pickled())}, "Object arrays cannot be loaded"),
                          ({"teleport": b64(enc)}, "unknown kind"),
                          ({"encoder": "%%%"}, "base64")]:
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT * FROM pgtraj.import_onnx('bad', 'x', %s, %s)", [TOK.to_json(), json.dumps(graphs)])
        assert words in str(err.value), str(err.value)
    assert conn.execute("SELECT count(*) FROM pgtraj.model_registry WHERE name = 'bad'").fetchone() == (0,)


def test_importing_needs_admin_rights(conn, db, login_role):
    archive = conn.execute("SELECT pgtraj.export_model('m')").fetchone()[0]
    with psycopg.connect(login_role("pgtraj_user")(db), autocommit=True) as c:
        assert c.execute("SELECT length(pgtraj.export_model('m')) > 0").fetchone() == (True,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT * FROM pgtraj.import_model(%s)", [archive])
    with psycopg.connect(login_role("pgtraj_admin")(db), autocommit=True) as c:
        assert c.execute("SELECT version FROM pgtraj.import_model(%s)", [archive]).fetchone() == (2,)
