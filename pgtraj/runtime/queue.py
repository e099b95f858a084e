"""Keeping embeddings fresh: embedding targets, their trigger-fed queue, and the worker that drains it
(``CALL pgtraj.process_queue()``, by hand or from pg_cron).

Workers take batches with ``FOR UPDATE SKIP LOCKED``, so any number may run at once without doing the same
row twice; each batch is committed on its own. A row that fails is retried with exponential backoff
(10 s, 20 s, 40 s, ... capped at an hour) and after ``max_attempts`` moved to pgtraj.embedding_errors.
"""

from __future__ import annotations

import json
import time

from . import inference
from .batch import describe, ensure_version_column, resolve_encoder
from .inference import InferenceError

BACKOFF_S, BACKOFF_MAX_S = 10, 3600


def create_target(plpy, name: str, source: str, traj_column: str, embedding_column: str, model: str,
                  batch_size: int, max_attempts: int, backfill: bool, threads: str | None) -> int:
    """Register a target, create its triggers and (with ``backfill``) queue every row not yet embedded by
    the model. Returns the number of rows queued."""
    q = plpy.quote_ident
    where = describe(plpy, source, traj_column, embedding_column)
    model_id, _ = resolve_encoder(plpy, model, where, threads)
    ensure_version_column(plpy, where)
    plpy.execute(plpy.prepare(
        "INSERT INTO pgtraj.embedding_targets (name, table_name, traj_column, embedding_column, model, batch_size,"
        " max_attempts) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        ["text", "text", "name", "name", "text", "int4", "int4"]),
        [name, where["table"], traj_column, embedding_column, model, batch_size, max_attempts])
    T, G, K = where["table"], q(traj_column), q(where["key"])
    args = f"{plpy.quote_literal(name)}, {plpy.quote_literal(where['key'])}"
    plpy.execute(f"CREATE TRIGGER {q(f'pgtraj_{name}_insert')} AFTER INSERT ON {T} FOR EACH ROW"
                 f" EXECUTE FUNCTION pgtraj._enqueue({args})")
    plpy.execute(f"CREATE TRIGGER {q(f'pgtraj_{name}_update')} AFTER UPDATE OF {G} ON {T} FOR EACH ROW"
                 f" WHEN (OLD.{G} IS DISTINCT FROM NEW.{G}) EXECUTE FUNCTION pgtraj._enqueue({args})")
    if not backfill:
        return 0
    E, V = q(embedding_column), q(where["version_column"])
    return plpy.execute(plpy.prepare(
        f"INSERT INTO pgtraj.embedding_queue (target, key) SELECT $1, {K}::text FROM {T}"
        f" WHERE {G} IS NOT NULL AND ({E} IS NULL OR {V} IS DISTINCT FROM $2) ON CONFLICT DO NOTHING",
        ["text", "int8"]), [name, model_id]).nrows()


def drop_target(plpy, name: str) -> None:
    row = _target(plpy, name)
    for suffix in ("insert", "update"):
        plpy.execute(f"DROP TRIGGER IF EXISTS {plpy.quote_ident(f'pgtraj_{name}_{suffix}')} ON {row['table_name']}")
    plpy.execute(plpy.prepare("DELETE FROM pgtraj.embedding_targets WHERE name = $1", ["text"]), [name])


def _target(plpy, name: str) -> dict:
    rows = plpy.execute(plpy.prepare("SELECT * FROM pgtraj.embedding_targets WHERE name = $1", ["text"]), [name])
    if not rows.nrows():
        raise InferenceError(f"no embedding target named {name!r}", sqlstate="42704",
                             hint="SELECT name FROM pgtraj.embedding_targets lists them")
    return dict(rows[0])


def process_queue(plpy, name: str | None, max_batches: int | None, threads: str | None) -> dict:
    """Drain the queue of one target (or of every target that is not paused)."""
    if name is not None:
        names = [name]
        _target(plpy, name)
    else:
        names = [r["name"] for r in plpy.execute("SELECT name FROM pgtraj.embedding_targets ORDER BY name")]
    out = {}
    for n in names:
        t = _target(plpy, n)
        if t["paused"]:
            plpy.notice(f"pgtraj.process_queue: target {n} is paused (SELECT pgtraj.resume_embedding('{n}'))")
            continue
        out[n] = _drain(plpy, t, max_batches, threads)
    return out


def _drain(plpy, t: dict, max_batches: int | None, threads: str | None) -> dict:
    q = plpy.quote_ident
    where = describe(plpy, t["table_name"], t["traj_column"], t["embedding_column"])
    model_id, sha = resolve_encoder(plpy, t["model"], where, threads)
    T, K, G = where["table"], q(where["key"]), q(t["traj_column"])
    E, V, kt = q(t["embedding_column"]), q(where["version_column"]), where["key_type"]
    take = plpy.prepare("SELECT key, attempts FROM pgtraj.embedding_queue WHERE target = $1 AND next_attempt_at"
                        " <= now() ORDER BY next_attempt_at, key LIMIT $2 FOR UPDATE SKIP LOCKED", ["text", "int4"])
    fetch = plpy.prepare(f"SELECT {K}::text AS key, {K} AS k, pgtraj._wkb({G}) AS w FROM {T}"
                         f" WHERE {K} = ANY ($1::text[]::{kt}[])", ["text[]"])
    update = plpy.prepare(f"UPDATE {T} AS t SET {E} = u.e::vector, {V} = $1 FROM unnest($2::{kt}[], $3::text[])"
                          f" AS u(k, e) WHERE t.{K} = u.k", ["int8", f"{kt}[]", "text[]"])
    clear = plpy.prepare(f"UPDATE {T} SET {E} = NULL, {V} = NULL WHERE {K} = ANY ($1::text[]::{kt}[])", ["text[]"])
    done_ = plpy.prepare("DELETE FROM pgtraj.embedding_queue WHERE target = $1 AND key = ANY ($2)", ["text", "text[]"])
    forget = plpy.prepare("DELETE FROM pgtraj.embedding_errors WHERE table_name = $1 AND embedding_column = $2"
                          " AND key = ANY ($3)", ["text", "name", "text[]"])
    retry = plpy.prepare(
        "UPDATE pgtraj.embedding_queue q SET attempts = q.attempts + 1, last_error = u.m,"
        " next_attempt_at = now() + make_interval(secs => least($4, $3 * 2 ^ q.attempts))"
        " FROM unnest($2::text[], $5::text[]) AS u(k, m) WHERE q.target = $1 AND q.key = u.k",
        ["text", "text[]", "int4", "int4", "text[]"])
    dead = plpy.prepare(
        "INSERT INTO pgtraj.embedding_errors AS e (table_name, embedding_column, key, model_id, sqlstate, error,"
        " attempts) SELECT $1, $2, u.k, $3, u.s, u.m, $7 FROM unnest($4::text[], $5::text[], $6::text[]) AS u(k, s, m)"
        " ON CONFLICT (table_name, embedding_column, key) DO UPDATE SET attempts = excluded.attempts,"
        " last_failed_at = now(), sqlstate = excluded.sqlstate, error = excluded.error, model_id = excluded.model_id",
        ["text", "name", "int8", "text[]", "text[]", "text[]", "int4"])
    job = plpy.execute(plpy.prepare(
        "INSERT INTO pgtraj.jobs (kind, args, status, started_at, pid) VALUES ('refresh', $1, 'running', now(),"
        " pg_backend_pid()) RETURNING id", ["jsonb"]),
        [json.dumps({"target": t["name"], "table": T, "model": t["model"], "model_id": model_id})])[0]["id"]
    plpy.commit()
    state = {"embedded": 0, "retrying": 0, "failed": 0, "removed": 0, "batches": 0}
    t0 = time.perf_counter()
    try:
        while max_batches is None or state["batches"] < max_batches:
            queued = plpy.execute(take, [t["name"], t["batch_size"]])
            if not queued.nrows():
                break
            attempts = {r["key"]: r["attempts"] for r in queued}
            rows = {r["key"]: r for r in plpy.execute(fetch, [list(attempts)])}
            gone = [k for k in attempts if k not in rows]               # the row was deleted
            nulls = [k for k, r in rows.items() if r["w"] is None]      # its trajectory was set to NULL
            todo = [k for k, r in rows.items() if r["w"] is not None]
            _, embs, errors = inference.embed_rows(plpy, [rows[k]["w"] for k in todo], model_id, sha, threads,
                                                   skip_errors=True)
            ok = [k for k, e in zip(todo, embs) if e is not None]
            plpy.execute(update, [model_id, [rows[k]["k"] for k in ok], [e for e in embs if e is not None]])
            if nulls:
                plpy.execute(clear, [nulls])
            plpy.execute(forget, [T, t["embedding_column"], ok])
            bad = [(todo[i], err) for i, err in sorted(errors.items())]
            final = [(k, e) for k, e in bad if attempts[k] + 1 >= t["max_attempts"]]
            again = [(k, e) for k, e in bad if attempts[k] + 1 < t["max_attempts"]]
            if again:
                plpy.execute(retry, [t["name"], [k for k, _ in again], BACKOFF_S, BACKOFF_MAX_S,
                                     [e.message for _, e in again]])
            if final:
                plpy.execute(dead, [T, t["embedding_column"], model_id, [k for k, _ in final],
                                    [e.sqlstate for _, e in final], [e.message for _, e in final], t["max_attempts"]])
            plpy.execute(done_, [t["name"], ok + gone + nulls + [k for k, _ in final]])
            state["embedded"] += len(ok)
            state["retrying"] += len(again)
            state["failed"] += len(final)
            state["removed"] += len(gone) + len(nulls)
            state["batches"] += 1
            state["seconds"] = round(time.perf_counter() - t0, 3)
            plpy.execute(plpy.prepare("UPDATE pgtraj.jobs SET done = $2, progress = $3 WHERE id = $1",
                                      ["int8", "int8", "jsonb"]), [job, state["embedded"], json.dumps(state)])
            plpy.commit()
            plpy.notice(f"pgtraj.process_queue {t['name']}: {state['embedded']} embedded, {state['retrying']} to"
                        f" retry, {state['failed']} failed")
    except Exception as exc:
        cancelled = isinstance(exc, plpy.SPIError) and getattr(exc, "sqlstate", None) == "57014"
        plpy.rollback()
        plpy.execute(plpy.prepare("UPDATE pgtraj.jobs SET status = $2, error = $3, finished_at = now(),"
                                  " progress = $4 WHERE id = $1", ["int8", "text", "text", "jsonb"]),
                     [job, "cancelled" if cancelled else "failed", str(exc)[:4000], json.dumps(state)])
        plpy.commit()
        raise
    plpy.execute(plpy.prepare("UPDATE pgtraj.jobs SET status = 'succeeded', finished_at = now(), total = $2,"
                              " progress = $3 WHERE id = $1", ["int8", "int8", "jsonb"]),
                 [job, state["embedded"], json.dumps(state)])
    plpy.commit()
    return state
