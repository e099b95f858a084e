"""Attacks a lower role could try on pgtraj, each run for real against the test cluster and shown to fail:
becoming superuser through a stored table name, writing pgtraj's tables to steer a more privileged worker,
forging jobs and dead letters, paths through internal functions, functions planted on the search path,
tokenizers and graphs chosen to exhaust or read the server, and a model cache shared across databases."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import psycopg
import pytest
import torch
from onnx import TensorProto, helper

from pgtraj.core.features import collate, to_inputs
from pgtraj.core.tokenizer import FORMAT, Tokenizer, TokenizerConfig
from pgtraj.db import registry
from pgtraj.learn.batches import to_tensors
from pgtraj.learn.export import export
from pgtraj.learn.model import ModelConfig, TrajectoryModel

from .test_embed_table import fill
from .test_inference import LINE, models, register  # noqa: F401  (models: the module's fixture)
from .test_model import TOK, TRIPS, batch

TABLE = "(id int PRIMARY KEY, geom geometry(LineStringM, 4326), embedding vector(32))"


@pytest.fixture
def world(login_role, db, models):  # noqa: F811  (login_role first: its roles outlive the database)
    """A superuser with a deployed model 'm' and a table `secret` the analyst may not touch; an analyst
    (pgtraj_user) with a schema and a table of its own."""
    analyst = login_role("pgtraj_user")
    with psycopg.connect(db, autocommit=True) as su, psycopg.connect(analyst(db), autocommit=True) as a:
        register(su, models[0])
        su.execute(f"CREATE SCHEMA analyst AUTHORIZATION {analyst.role}")
        su.execute(f"CREATE TABLE secret {TABLE}")
        fill(su, "secret", n=5)
        a.execute(f"CREATE TABLE analyst.trips {TABLE}")
        fill(a, "analyst.trips", n=5)
        yield su, a, analyst.role


def refused(conn, query, params=None, sqlstate="42501"):
    with pytest.raises(psycopg.Error) as err:
        conn.execute(query, params)
    assert err.value.sqlstate == sqlstate, f"{query}: {err.value.sqlstate} {err.value}"
    return err.value


def test_a_stored_table_name_cannot_make_a_user_superuser(world):
    su, a, role = world
    a.execute("SELECT pgtraj.create_embedding_target('cr', 'analyst.trips', 'geom', 'embedding', 'm')")
    refused(a, "UPDATE pgtraj.embedding_targets SET table_name = 'secret' WHERE name = 'cr'")
    refused(a, f"UPDATE pgtraj.embedding_targets SET traj_column = 'x; ALTER ROLE {role} SUPERUSER' WHERE name = 'cr'")
    # not even a superuser can store such a name: the column holds a table's OID (regclass)
    with pytest.raises(psycopg.Error) as err:
        su.execute(f"UPDATE pgtraj.embedding_targets SET table_name = 'x.y; ALTER ROLE {role} SUPERUSER'"
                   " WHERE name = 'cr'")
    assert err.value.sqlstate in ("42602", "3F000", "42P01")
    su.execute("SELECT pgtraj.drop_embedding_target('cr')")
    assert su.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", [role]).fetchone() == (False,)


@pytest.mark.parametrize("write", [
    "INSERT INTO pgtraj.embedding_targets (name, table_name, key_column, traj_column, embedding_column, model)"
    " VALUES ('evil', 'secret', 'id', 'geom', 'embedding', 'm')",
    "UPDATE pgtraj.embedding_targets SET model = 'm@1'",
    "DELETE FROM pgtraj.embedding_targets",
    "INSERT INTO pgtraj.embedding_queue (target, key) VALUES ('sec', '1')",
    "UPDATE pgtraj.embedding_queue SET attempts = 0",
    "DELETE FROM pgtraj.embedding_errors",
    "INSERT INTO pgtraj.jobs (kind, created_by) VALUES ('embed_table', 'postgres')",
    "UPDATE pgtraj.jobs SET status = 'failed'",
    "INSERT INTO pgtraj.model_artifacts (model_id, kind, bytes, sha256) VALUES (1, 'x', '\\x00', 'x')",
    "UPDATE pgtraj.model_registry SET tokenizer = '{}'",
    "INSERT INTO pgtraj.deployment_log (model_name, model_id, strategy) VALUES ('m', 1, 'version')",
    "UPDATE pgtraj.training_runs SET status = 'failed'",
    "UPDATE pgtraj.installation SET python_path = '/tmp/evil'",
])
def test_no_pgtraj_role_writes_pgtraj_tables(world, login_role, db, write):
    su, a, _ = world
    refused(a, write)
    with psycopg.connect(login_role("pgtraj_admin")(db), autocommit=True) as admin:
        refused(admin, write)


def test_a_target_needs_rights_on_its_table(world):
    su, a, _ = world
    refused(a, "SELECT pgtraj.create_embedding_target('evil', 'secret', 'geom', 'embedding', 'm')")
    refused(a, "SELECT pgtraj._target_add('evil', 'secret', 'id', 'geom', 'embedding', 'm', 10, 5, 'route')")
    err = refused(a, "SELECT pgtraj._target_add('evil', 'analyst.trips', 'id', 'geom', 'embedding', 'm', 10, 5, 'route',"
                     " caller => 'postgres')")
    assert "may not act for role postgres" in err.diag.message_primary
    assert su.execute("SELECT count(*) FROM pgtraj.embedding_targets").fetchone() == (0,)
    a.execute("SELECT pgtraj.create_embedding_target('mine', 'analyst.trips', 'geom', 'embedding', 'm')")
    a.execute("CALL pgtraj.process_queue('mine')")
    assert a.execute("SELECT count(embedding) FROM analyst.trips").fetchone() == (5,)


def test_another_tables_queue_can_be_neither_fed_nor_drained(world):
    su, a, _ = world
    assert su.execute("SELECT pgtraj.create_embedding_target('sec', 'secret', 'geom', 'embedding', 'm')"
                      ).fetchone() == (5,)
    for attack in ("SELECT pgtraj._queue_add('sec', ARRAY['999'])",
                   "SELECT * FROM pgtraj._queue_take('sec', 10)",
                   "SELECT pgtraj._queue_done('sec', 1, ARRAY['1'], '{}', '{}', '{}', '{}', '{}')",
                   "SELECT pgtraj._target_remove('sec')",
                   "SELECT pgtraj._target_pause('sec', true)",
                   "SELECT pgtraj._schedule_refresh('sec', '* * * * *')"):
        refused(a, attack)
    refused(a, "CALL pgtraj.process_queue('sec')", sqlstate="42704")  # row security: not even visible
    assert a.execute("SELECT count(*) FROM pgtraj.embedding_queue").fetchone() == (0,)
    assert a.execute("SELECT count(*) FROM pgtraj.embedding_status").fetchone() == (0,)
    # a trigger of one's own naming another table's target feeds nothing: the insert is refused instead
    a.execute("CREATE TRIGGER forged AFTER INSERT ON analyst.trips FOR EACH ROW EXECUTE FUNCTION pgtraj._enqueue('sec')")
    refused(a, "INSERT INTO analyst.trips (id, geom) SELECT 100, geom FROM analyst.trips WHERE id = 1")
    assert su.execute("SELECT count(*) FROM pgtraj.embedding_queue WHERE target = 'sec'").fetchone() == (5,)
    su.execute("CALL pgtraj.process_queue()")  # the owner's worker is unaffected
    assert su.execute("SELECT count(embedding) FROM secret").fetchone() == (5,)


def test_jobs_and_dead_letters_cannot_be_forged(world):
    su, a, _ = world
    su.execute("UPDATE secret SET geom = ST_SetSRID(ST_MakeLine(ST_MakePointM(116.3, 95, 1e9),"
               " ST_MakePointM(116.4, 95, 1e9 + 60)), 4326) WHERE id = 1")
    su.execute("CALL pgtraj.embed_table('secret', 'geom', 'embedding', 'm')")
    job = su.execute("SELECT id FROM pgtraj.jobs").fetchone()[0]
    refused(a, "SELECT pgtraj._job_start('embed_table', 'secret', 'embedding', 'm', 1, 0)")
    refused(a, "SELECT pgtraj._job_start('embed_table', 'analyst.trips', 'embedding', 'm', 1, 0, caller => 'postgres')")
    refused(a, "SELECT pgtraj._job_update(%s, 0, '{}', 'failed')", [job])
    refused(a, "SELECT pgtraj._record_errors('secret', 'embedding', 1, ARRAY['1'], '{}', '{}', '{}')")
    refused(a, "SELECT pgtraj._run_start('m', 'x', 'next_cell', '{}')")
    assert su.execute("SELECT status, created_by FROM pgtraj.jobs").fetchone() == ("succeeded", "postgres")
    assert su.execute("SELECT count(*) FROM pgtraj.embedding_errors").fetchone() == (1,)
    assert a.execute("SELECT count(*) FROM pgtraj.embedding_errors").fetchone() == (0,)  # keys of a table it cannot read


def test_internal_functions_build_no_path_from_their_arguments(world):
    su, a, _ = world
    model_id, kind, sha, meta, _ = su.execute("SELECT * FROM pgtraj._resolve('m', 'encoder')").fetchone()
    wkb = su.execute("SELECT pgtraj._wkb(geom) FROM secret WHERE id = 2").fetchone()[0]
    embed = "SELECT pgtraj._embed(ARRAY[%s::bytea], ROW(%s, %s, %s, %s, 1)::pgtraj.model_ref)"
    for bad_sha, bad_meta in (("../../../../tmp/pgtraj-attack", meta), (sha, "../../../../tmp/pgtraj-attack")):
        err = refused(a, embed, [wkb, model_id, kind, bad_sha, bad_meta], sqlstate="22023")
        assert "64 hexadecimal digits" in err.diag.message_primary
    refused(a, embed, [wkb, model_id, kind, "ab" * 32, meta], sqlstate="22023")  # well formed, not the model's graph
    refused(a, embed, [wkb, model_id, kind, sha, sha], sqlstate="22023")
    refused(a, embed, [wkb, model_id, "next_cell", sha, meta], sqlstate="22023")  # resolved for another graph
    assert not list(Path("/tmp").glob("pgtraj-attack*"))
    # what the runtime keeps on disk is named by content digests only
    cache = Path(su.execute("SELECT current_setting('data_directory')").fetchone()[0]) / "pgtraj_cache"
    assert all(re.fullmatch(r"[0-9a-f]{64}\.(onnx|meta)", p.name) for p in cache.iterdir() if p.is_file())
    # the same arguments as pgtraj._resolve gives them do what pgtraj.embed does
    got, want = a.execute(embed.replace("SELECT", "SELECT", 1) + "::text, ARRAY[pgtraj.embed(geom, 'm')]::text"
                          " FROM analyst.trips WHERE id = 2", [wkb, model_id, kind, sha, meta]).fetchone()
    assert got == want


# functions a role with CREATE on public could plant to run as whoever calls pgtraj: each is a better match
# than pg_catalog's polymorphic or implicitly cast candidate, so an unpinned search_path would choose it
SHADOWS = [
    ("cardinality", "geometry[]", "int"), ("cardinality", "text[]", "int"), ("cardinality", "bytea[]", "int"),
    ("unnest", "geometry[]", "SETOF geometry"), ("unnest", "text[]", "SETOF text"), ("unnest", "bytea[]", "SETOF bytea"),
    ("array_position", "text[], text", "int"), ("array_position", "bytea[], bytea", "int"),
    ("format", "text, text", "text"), ("format", "text, name", "text"), ("format", "text, regclass, name", "text"),
    ("jsonb_build_object", "text, text", "jsonb"),
    ("has_column_privilege", "name, regclass, name, text", "boolean"),
    ("st_makepointm", "double precision, double precision, numeric", "geometry"),
]


def test_functions_planted_on_the_search_path_are_never_called(world, login_role, db, models):  # noqa: F811
    su, _, _ = world
    planter = login_role()
    su.execute(f"GRANT CREATE ON SCHEMA public TO {planter.role}")
    with psycopg.connect(planter(db), autocommit=True) as p:
        for name, args, returns in SHADOWS:
            p.execute(f"CREATE FUNCTION public.{name}({args}) RETURNS {returns} LANGUAGE plpgsql AS $$"
                      f" BEGIN RAISE EXCEPTION 'planted {name}({args}) ran as %', current_user; END $$")
    su.execute("SET search_path = \"$user\", public")  # the default: public is on the path
    err = refused(su, "SELECT cardinality(array_agg(geom)) FROM secret", sqlstate="P0001")  # the plant works...
    assert "planted cardinality(geometry[]) ran as postgres" in err.diag.message_primary
    su.execute(f"CREATE TABLE trips {TABLE}")
    fill(su, "trips", n=6)
    calls = [
        "SELECT pgtraj.line(array_agg(ST_Force2D(d.geom)), array_agg(to_timestamp(ST_M(d.geom)))) FROM secret s,"
        " ST_DumpPoints(s.geom) d WHERE s.id = 1",
        "SELECT pgtraj.embed(array_agg(ST_Force2D(d.geom)), array_agg(to_timestamp(ST_M(d.geom))), 'm')"
        " FROM secret s, ST_DumpPoints(s.geom) d WHERE s.id = 1",
        "SELECT pgtraj.embed(array_agg(geom ORDER BY id), 'm') FROM secret",
        "SELECT pgtraj.embed(geom, 'm'), pgtraj.score(geom, 'm'), pgtraj.similarity(geom, geom, 'm') FROM secret",
        "SELECT count(*) FROM secret, pgtraj.predict_next(geom, 'm')",
        "SELECT pgtraj.predict_path(geom, 'm', steps => 2) FROM secret WHERE id = 1",
        "SELECT count(*) FROM secret, pgtraj.tokenize(geom, (SELECT tokenizer FROM pgtraj.model_registry LIMIT 1))",
        "CALL pgtraj.embed_table('secret', 'geom', 'embedding', 'm')",
        "SELECT pgtraj.create_embedding_target('t', 'trips', 'geom', 'embedding', 'm')",
        "CALL pgtraj.process_queue()",
        "SELECT pgtraj.pause_embedding('t'), pgtraj.resume_embedding('t')",
        "SELECT pgtraj.create_hnsw_index('secret', 'embedding')",
        "SELECT count(*) FROM pgtraj.similar('secret', 'embedding', row_id => 1, k => 3)",
        "SELECT * FROM pgtraj.deploy('m', '1')",
        "SELECT * FROM pgtraj.import_model(pgtraj.export_model('m'), 'copy')",
        "SELECT pgtraj.drop_embedding_target('t')",
        "SELECT * FROM pgtraj.embedding_status, pgtraj.job_status, pgtraj.models",
    ]
    for call in calls:
        su.execute(call)
    register(su, models[1], name="m")  # registry.register: pgtraj._register and the graph checks
    assert su.execute("SELECT count(*) FROM pgtraj.model_registry").fetchone() == (3,)


def zigzag(n: int) -> list:
    """Fixes alternating between two points ~5 km apart: every step is a long jump on the grid."""
    return [(116.30 + 0.06 * (i % 2), 39.90, 1_224_720_000.0 + 60 * i) for i in range(n)]


def test_caller_tokenizers_are_validated_and_bounded(world):
    su, _, _ = world
    line = "SRID=4326;LINESTRING M(" + ", ".join(f"{x} {y} {t}" for x, y, t in zigzag(201)) + ")"
    cfg = json.loads(TOK.to_json())
    for config, words in ((1e9, "must be an integer"), (10**9, "must be 0-64"), ("32", "must be an integer")):
        bad = {**cfg, "config": {**cfg["config"], "max_interpolation_cells": config}}
        err = refused(su, "SELECT count(*) FROM pgtraj.tokenize(%s::geometry, %s)", [line, json.dumps(bad)], "22023")
        assert words in err.diag.message_primary
    for bad, words in (({"format": FORMAT}, "no config object"),
                       ({"format": FORMAT, "config": {}, "vocab": ["8928308280fffff", "not a cell"]}, "not an H3 cell"),
                       ({"format": FORMAT, "config": {"resolution": "nine"}, "vocab": []}, "must be an integer"),
                       ({"format": FORMAT, "config": {"colour": 1}, "vocab": []}, "unknown tokenizer config keys"),
                       ([1, 2], "not a pgtraj tokenizer")):
        err = refused(su, "SELECT count(*) FROM pgtraj.tokenize(%s::geometry, %s)", [line, json.dumps(bad)], "22023")
        assert words in err.diag.message_primary
    widest = {**cfg, "config": {**cfg["config"], "max_interpolation_cells": 64}}
    n = su.execute("SELECT count(*) FROM pgtraj.tokenize(%s::geometry, %s)", [line, json.dumps(widest)]).fetchone()[0]
    assert 201 <= n <= 201 * 65  # each jump filled with at most 64 cells


def onnx_encoder(*, external: bool = False, domain: str | None = None) -> bytes:
    """A graph with pgtraj's inputs and an encoder's output (mean of the continuous features times W):
    optionally with W kept in an 'external file' that names a path out of the data directory, or with an
    operator of a custom domain."""
    ins = [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["B", "T"]),
           helper.make_tensor_value_info("dow", TensorProto.INT64, ["B", "T"]),
           helper.make_tensor_value_info("minute", TensorProto.INT64, ["B", "T"]),
           helper.make_tensor_value_info("cont", TensorProto.FLOAT, ["B", "T", 8])]
    out = helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["B", 8])
    w = helper.make_tensor("W", TensorProto.FLOAT, [8, 8], np.eye(8, dtype=np.float32).flatten().tolist())
    if external:
        w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[8, 8], data_location=TensorProto.EXTERNAL)
        entry = w.external_data.add()
        entry.key, entry.value = "location", "../../../../../etc/passwd"
    nodes = [helper.make_node("ReduceMean", ["cont"], ["mean"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["mean", "W"], ["emb"] if domain is None else ["pre"])]
    opsets = [helper.make_opsetid("", 17)]
    if domain is not None:
        nodes.append(helper.make_node("Exfiltrate", ["pre"], ["emb"], domain=domain))
        opsets.append(helper.make_opsetid(domain, 1))
    graph = helper.make_graph(nodes, "encoder", ins, [out], [w])
    return helper.make_model(graph, opset_imports=opsets, ir_version=8).SerializeToString()


def test_graphs_that_read_files_or_load_custom_operators_are_refused(world, login_role, db):
    su, _, _ = world
    b64 = base64.b64encode
    tok = TOK.to_json()
    ok = su.execute("SELECT version FROM pgtraj.import_onnx('plain', 'x', %s, %s)",
                    [tok, json.dumps({"encoder": b64(onnx_encoder()).decode()})]).fetchone()
    assert ok == (1,)
    archive = json.loads(bytes(su.execute("SELECT pgtraj.export_model('plain@1')").fetchone()[0]))
    with psycopg.connect(login_role("pgtraj_admin")(db), autocommit=True) as admin:
        for graph, words in ((onnx_encoder(external=True), "external file"),
                             (onnx_encoder(domain="com.attacker"), "custom domain"),
                             (b"\x00" * 64, "not an ONNX model")):
            err = refused(admin, "SELECT * FROM pgtraj.import_onnx('evil', 'x', %s, %s)",
                          [tok, json.dumps({"encoder": b64(graph).decode()})], "22023")
            assert words in err.diag.message_primary
            doc = {**archive, "artifacts": {"encoder": {"sha256": hashlib.sha256(graph).hexdigest(),
                                                        "bytes": b64(graph).decode()}}}
            err = refused(admin, "SELECT * FROM pgtraj.import_model(%s)", [json.dumps(doc).encode()], "22023")
            assert words in err.diag.message_primary
            reg = refused(admin, "SELECT pgtraj._register('evil', 'x', '{}', %s, '{}', NULL, true, NULL, NULL, NULL,"
                                 " ARRAY['encoder'], ARRAY[%s::bytea])", [tok, graph], "22023")
            assert words in reg.diag.message_primary
    assert su.execute("SELECT count(*) FROM pgtraj.model_registry WHERE name = 'evil'").fetchone() == (0,)


def test_model_files_are_never_served_for_another_database(databases, installed_template, models):  # noqa: F811
    """Model id 1 in two databases of one cluster, with different tokenizers: each database serves its
    own, also in parallel workers (which load only from the file cache)."""
    tok_b = Tokenizer.fit(TRIPS, TokenizerConfig(resolution=9, min_count=1, coarsest_resolution=7))
    assert tok_b.vocab_size != TOK.vocab_size
    torch.manual_seed(5)
    model_b = TrajectoryModel.for_tokenizer(tok_b, {**ModelConfig.preset("tiny"), "dropout": 0.0}).eval()
    example = to_tensors(collate([to_inputs(tok_b.encode(t)) for t in TRIPS[:2]]))
    names = [databases.create(installed_template) for _ in range(2)]
    try:
        with psycopg.connect(databases.url(names[0]), autocommit=True) as a, \
                psycopg.connect(databases.url(names[1]), autocommit=True) as b:
            register(a, models[0])
            mv = registry.register(b, "m", objective="next_cell", tokenizer=json.loads(tok_b.to_json()),
                                   artifacts={"encoder": export(model_b, "encoder", example)},
                                   config={"train": {"max_len": 48}, "model": model_b.cfg.to_dict()})
            registry.deploy(b, "m", mv.version)
            for c in (a, b):
                c.execute(f"CREATE TABLE trips {TABLE.replace('vector(32)', 'vector')}")
                fill(c, "trips", n=6)
            assert a.execute("SELECT pgtraj.warmup('m') ->> 'model_id'").fetchone() == \
                b.execute("SELECT pgtraj.warmup('m') ->> 'model_id'").fetchone() == ("1",)
            with torch.no_grad():
                want = model_b.embed(**to_tensors(collate([to_inputs(tok_b.encode(t)) for t in TRIPS[:6]]))).numpy()
            for parallel in ("off", "on"):
                b.execute(f"SET force_parallel_mode = {parallel}")
                b.execute("SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0")
                got = np.stack([np.array(json.loads(e)) for (e,) in
                                b.execute("SELECT pgtraj.embed(geom, 'm')::text FROM trips ORDER BY id").fetchall()])
                assert np.abs(got - want).max() < 1e-5, parallel
            with torch.no_grad():
                other = models[0].embed(**batch(TRIPS[:6])).numpy()
            got_a = np.stack([np.array(json.loads(e)) for (e,) in
                              a.execute("SELECT pgtraj.embed(geom, 'm')::text FROM trips ORDER BY id").fetchall()])
            assert np.abs(got_a - other).max() < 1e-5
    finally:
        for n in names:
            databases.drop(n)
