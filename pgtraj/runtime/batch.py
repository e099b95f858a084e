"""Batch embedding inside PostgreSQL: ``CALL pgtraj.embed_table(...)``.

Fills a pgvector column in batches, incrementally: only rows whose embedding is missing or was made by
another model version (the ``<embedding column>_model`` column says which) are embedded. Every batch is
committed on its own, so an interrupted run (cancel, crash, timeout) keeps what it finished and the next
run picks up the rest. A row that cannot be embedded is recorded in pgtraj.embedding_errors and skipped;
the others in its batch are kept. Progress goes to NOTICEs and to the job's row in pgtraj.jobs.
"""

from __future__ import annotations

import json
import time

from . import inference
from .inference import InferenceError

VECTOR_TYPES = ("vector",)
TRAJECTORY_TYPES = ("geometry", "tgeompoint")


def resolve_table(plpy, source: str) -> tuple[int, str]:
    """The oid of a table named by the caller, and its name as regclass prints it (quoted and qualified as
    needed, so it can go into SQL as is); an unknown table raises 42P01 from the cast."""
    row = plpy.execute(plpy.prepare("SELECT $1::regclass::oid AS oid, $1::regclass::text AS t", ["text"]), [source])[0]
    return row["oid"], row["t"]


def _column(plpy, oid: int, table: str, name: str) -> dict:
    rows = plpy.execute(plpy.prepare(
        "SELECT attname AS name, atttypid::regtype::text AS type, atttypmod AS typmod,"
        " format_type(atttypid, atttypmod) AS full"
        " FROM pg_attribute WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped",
        ["oid", "name"]), [oid, name])
    if not rows.nrows():
        raise InferenceError(f"column {name!r} of {table} does not exist", sqlstate="42703")
    return dict(rows[0])


def _primary_key(plpy, oid: int, table: str) -> tuple[str, str]:
    rows = plpy.execute(plpy.prepare(
        "SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type FROM pg_index i"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)"
        " WHERE i.indrelid = $1 AND i.indisprimary", ["oid"]), [oid])
    if rows.nrows() != 1:
        raise InferenceError(f"{table} needs a single-column primary key to be embedded in batches"
                             f" (it has {'none' if not rows.nrows() else 'a composite one'})", sqlstate="42P10",
                             hint=f"ALTER TABLE {table} ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
    return rows[0]["name"], rows[0]["type"]


def describe(plpy, source: str, traj_column: str, embedding_column: str) -> dict:
    """Where embeddings go, checked: the table (as regclass prints it), its single-column primary key and
    type, the trajectory and vector columns. Raises InferenceError naming what does not fit."""
    q = plpy.quote_ident
    oid, table = resolve_table(plpy, source)
    traj = _column(plpy, oid, table, traj_column)
    if traj["type"] not in TRAJECTORY_TYPES:
        raise InferenceError(f"{table}.{traj_column} is {traj['full']}, not a trajectory", sqlstate="42804",
                             hint="a geometry (LINESTRING M, M = epoch seconds) or tgeompoint column")
    emb = _column(plpy, oid, table, embedding_column)
    if emb["type"] not in VECTOR_TYPES:
        raise InferenceError(f"{table}.{embedding_column} is {emb['full']}, not a pgvector vector", sqlstate="42804",
                             hint=f"ALTER TABLE {table} ADD COLUMN {q(embedding_column)} vector")
    key, key_type = _primary_key(plpy, oid, table)
    return {"oid": oid, "table": table, "key": key, "key_type": key_type, "emb": emb,
            "version_column": f"{embedding_column}_model"}


def resolve_encoder(plpy, model: str, where: dict, threads: str | None) -> tuple[int, str]:
    """(model id, encoder sha256) of ``model``, checked against the vector column's dimension."""
    resolved = plpy.execute(plpy.prepare("SELECT model_id, sha256 FROM pgtraj._resolve($1, 'encoder')", ["text"]),
                            [model])[0]
    model_id, sha = resolved["model_id"], resolved["sha256"]
    m, sess = inference.session(plpy, model_id, "encoder", sha, threads)
    dim, emb = sess.get_outputs()[0].shape[1], where["emb"]
    if emb["typmod"] > 0 and emb["typmod"] != dim:
        column = f"{where['table']}.{emb['name']}"
        raise InferenceError(f"model {m.label} embeds in {dim} dimensions but {column} is {emb['full']}",
                             sqlstate="42804",
                             hint=f"ALTER TABLE {where['table']} ALTER COLUMN {plpy.quote_ident(emb['name'])} TYPE"
                                  f" vector({dim}) USING NULL, or use a model of that size")
    return model_id, sha


def ensure_version_column(plpy, where: dict) -> None:
    """The <embedding column>_model column (bigint): the model version of each embedding."""
    if plpy.execute(plpy.prepare("SELECT 1 FROM pg_attribute WHERE attrelid = $1 AND attname = $2 AND NOT"
                                 " attisdropped", ["oid", "name"]), [where["oid"], where["version_column"]]).nrows():
        return
    plpy.notice(f"pgtraj: adding column {where['version_column']} to {where['table']} (the model version of each"
                " embedding, so that refreshes redo only stale rows)")
    plpy.execute(f"ALTER TABLE {where['table']} ADD COLUMN {plpy.quote_ident(where['version_column'])} bigint")


def embed_table(plpy, source: str, traj_column: str, embedding_column: str, model: str, batch_size: int,
                threads: str | None) -> dict:
    if not 1 <= batch_size <= 100_000:
        raise InferenceError(f"batch_size must be from 1 to 100000, not {batch_size}", sqlstate="22023")
    q = plpy.quote_ident
    where = describe(plpy, source, traj_column, embedding_column)
    table, key, key_type = where["table"], where["key"], where["key_type"]
    model_id, sha = resolve_encoder(plpy, model, where, threads)
    ensure_version_column(plpy, where)
    version_column = where["version_column"]
    T, K, E, V, G = table, q(key), q(embedding_column), q(version_column), q(traj_column)
    stale = f"{G} IS NOT NULL AND ({E} IS NULL OR {V} IS DISTINCT FROM $1)"
    lock = plpy.execute(plpy.prepare("SELECT pg_try_advisory_lock(hashtext('pgtraj.embed_table'),"
                                     " hashtext($1)) AS ok", ["text"]), [f"{table}.{embedding_column}"])[0]["ok"]
    if not lock:
        raise InferenceError(f"another pgtraj.embed_table is filling {table}.{embedding_column}", sqlstate="55P03",
                             hint="SELECT * FROM pgtraj.job_status WHERE status = 'running' shows it")
    try:
        total = plpy.execute(plpy.prepare(f"SELECT count(*) AS n FROM {T} WHERE {stale}", ["int8"]),
                             [model_id])[0]["n"]
        args = {"table": table, "traj_column": traj_column, "embedding_column": embedding_column, "model": model,
                "model_id": model_id, "batch_size": batch_size}
        job = plpy.execute(plpy.prepare(
            "INSERT INTO pgtraj.jobs (kind, args, status, total, started_at, pid)"
            " VALUES ('embed_table', $1, 'running', $2, now(), pg_backend_pid()) RETURNING id",
            ["jsonb", "int8"]), [json.dumps(args), total])[0]["id"]
        plpy.commit()
        return _run(plpy, job, model_id, sha, threads, total, batch_size, table, embedding_column, key_type,
                    select=plpy.prepare(f"SELECT {K} AS k, {K}::text AS key, pgtraj._wkb({G}) AS w FROM {T}"
                                        f" WHERE {stale} AND ($2::{key_type} IS NULL OR {K} > $2) ORDER BY {K}"
                                        " LIMIT $3", ["int8", key_type, "int4"]),
                    update=plpy.prepare(f"UPDATE {T} AS t SET {E} = u.e::vector, {V} = $1 FROM unnest($2::{key_type}[],"
                                        f" $3::text[]) AS u(k, e) WHERE t.{K} = u.k", ["int8", f"{key_type}[]", "text[]"]))
    finally:
        plpy.execute(plpy.prepare("SELECT pg_advisory_unlock(hashtext('pgtraj.embed_table'), hashtext($1))",
                                  ["text"]), [f"{table}.{embedding_column}"])


def _run(plpy, job, model_id, sha, threads, total, batch_size, table, column, key_type, *, select, update) -> dict:
    forget = plpy.prepare("DELETE FROM pgtraj.embedding_errors WHERE table_name = $1 AND embedding_column = $2"
                          " AND key = ANY ($3)", ["text", "name", "text[]"])
    record = plpy.prepare(
        "INSERT INTO pgtraj.embedding_errors AS e (table_name, embedding_column, key, model_id, sqlstate, error)"
        " SELECT $1, $2, u.k, $3, u.s, u.m FROM unnest($4::text[], $5::text[], $6::text[]) AS u(k, s, m)"
        " ON CONFLICT (table_name, embedding_column, key) DO UPDATE SET attempts = e.attempts + 1,"
        " last_failed_at = now(), sqlstate = excluded.sqlstate, error = excluded.error, model_id = excluded.model_id",
        ["text", "name", "int8", "text[]", "text[]", "text[]"])
    progress = plpy.prepare("UPDATE pgtraj.jobs SET done = $2, progress = $3 WHERE id = $1", ["int8", "int8", "jsonb"])
    finish = plpy.prepare("UPDATE pgtraj.jobs SET status = $2, error = $3, finished_at = now(), progress = $4"
                          " WHERE id = $1", ["int8", "text", "text", "jsonb"])
    done = failed = batches = 0
    last = None
    t0 = time.perf_counter()
    state = {}
    try:
        while True:
            rows = plpy.execute(select, [model_id, last, batch_size])
            if not rows.nrows():
                break
            _, embs, errors = inference.embed_rows(plpy, [r["w"] for r in rows], model_id, sha, threads,
                                                   skip_errors=True)
            ok = [i for i, e in enumerate(embs) if e is not None]
            bad = sorted(errors)
            plpy.execute(update, [model_id, [rows[i]["k"] for i in ok], [embs[i] for i in ok]])
            plpy.execute(forget, [table, column, [rows[i]["key"] for i in ok]])
            if bad:
                plpy.execute(record, [table, column, model_id, [rows[i]["key"] for i in bad],
                                      [errors[i].sqlstate for i in bad], [errors[i].message for i in bad]])
            done, failed, batches = done + len(ok), failed + len(bad), batches + 1
            last = rows[rows.nrows() - 1]["k"]
            elapsed = time.perf_counter() - t0
            state = {"embedded": done, "failed": failed, "batches": batches, "seconds": round(elapsed, 3),
                     "rows_per_second": round(done / elapsed, 1) if elapsed > 0 else None}
            plpy.execute(progress, [job, done + failed, json.dumps(state)])
            plpy.commit()  # this batch is safe from here on
            plpy.notice(f"pgtraj.embed_table {table}.{column}: {done + failed}/{total} rows"
                        f" ({state['rows_per_second']} rows/s){f', {failed} failed' if failed else ''}")
    except Exception as exc:
        # the open batch is lost, the committed ones stay; say so in the job row, then fail as asked
        cancelled = isinstance(exc, plpy.SPIError) and getattr(exc, "sqlstate", None) == "57014"
        plpy.rollback()
        plpy.execute(finish, [job, "cancelled" if cancelled else "failed", str(exc)[:4000], json.dumps(state)])
        plpy.commit()
        raise
    plpy.execute(finish, [job, "succeeded", None, json.dumps(state)])
    plpy.commit()
    if failed:
        plpy.warning(f"pgtraj.embed_table {table}.{column}: {failed} row(s) could not be embedded",
                     hint=f"SELECT key, error FROM pgtraj.embedding_errors WHERE table_name = '{table}'")
    return {"job": job, "total": total, **state}
