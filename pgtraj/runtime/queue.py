"""Keeping embeddings fresh: embedding targets, their trigger-fed queue, and the worker that drains it
(``CALL pgtraj.process_queue()``, by hand or from pg_cron).

Targets, queue rows and dead letters are written through pgtraj's SECURITY DEFINER functions
(sql/60_queue.sql), each of which checks the caller's rights on the target's table; the embeddings
themselves are written here, with the caller's own rights. Workers take batches with ``FOR UPDATE SKIP
LOCKED``, so any number may run at once without doing the same row twice; each batch is committed on its
own. A row that fails, whatever the reason, is retried with exponential backoff (10 s, 20 s, 40 s, ...
capped at an hour) and after ``max_attempts`` moved to pgtraj.embedding_errors.
"""

from __future__ import annotations

import time

from pgtraj.runtime.batch import (
    Job,
    Reader,
    begin_procedure,
    check_dimensions,
    citus_kind,
    count_stale,
    describe,
    ensure_version_column,
    resolve,
    run_shards,
)
from pgtraj.runtime.server import InferenceError, advisory_lock
from pgtraj.runtime.tasks import encoder


def create_target(plpy, name: str, source: str, traj_column: str, embedding_column: str, model: str,
                  batch_size: int, max_attempts: int, backfill: bool, aspect: str = "route") -> int:
    """Register a target, create its triggers and (with ``backfill``) queue every row not yet embedded by
    the model. Returns the number of rows queued."""
    q = plpy.quote_ident
    encoder.check_aspect(aspect)
    where = describe(plpy, source, traj_column, embedding_column)
    ref = resolve(plpy, model, "encoder")
    check_dimensions(plpy, ref, where, aspect)
    ensure_version_column(plpy, where)
    plpy.execute(plpy.prepare("SELECT pgtraj._target_add($1, $2::pg_catalog.oid::pg_catalog.regclass, $3, $4, $5, $6,"
                              " $7, $8, $9)", ["text", "oid", "name", "name", "name", "text", "int4", "int4", "text"]),
                 [name, where.oid, where.key, traj_column, embedding_column, model, batch_size, max_attempts, aspect])
    T, G = where.sql, q(traj_column)
    if citus_kind(plpy, where.oid) == "distributed":
        # Citus runs a table's triggers on its shards, on the workers, where the coordinator's queue is not:
        # there a changed trajectory clears its row's embedding instead, and process_queue embeds the rows
        # without a current one on the workers, shard by shard (as embed_table does); what it has to do now
        # is every such row (counted in this backend's distributed transaction, which sees the new column)
        lit = plpy.quote_literal
        plpy.execute("SELECT pg_catalog.set_config('citus.enable_unsafe_triggers', 'on', true)")
        plpy.execute(f"CREATE TRIGGER {q(f'pgtraj_{name}_stale')} BEFORE UPDATE OF {G} ON {T} FOR EACH ROW"
                     f" WHEN (OLD.{G}::pg_catalog.text IS DISTINCT FROM NEW.{G}::pg_catalog.text)"
                     f" EXECUTE FUNCTION pgtraj._clear_embedding({lit(embedding_column)}, {lit(where.version_column)})")
        return count_stale(plpy, where, ref, False)
    arg = plpy.quote_literal(name)
    # run with the caller's rights: creating a trigger needs the TRIGGER privilege on the table
    plpy.execute(f"CREATE TRIGGER {q(f'pgtraj_{name}_insert')} AFTER INSERT ON {T} FOR EACH ROW"
                 f" EXECUTE FUNCTION pgtraj._enqueue({arg})")
    # changed = another text form: exact, and needs no operator of the trajectory's type on the search path
    plpy.execute(f"CREATE TRIGGER {q(f'pgtraj_{name}_update')} AFTER UPDATE OF {G} ON {T} FOR EACH ROW"
                 f" WHEN (OLD.{G}::pg_catalog.text IS DISTINCT FROM NEW.{G}::pg_catalog.text)"
                 f" EXECUTE FUNCTION pgtraj._enqueue({arg})")
    if not backfill:
        return 0
    E, V, K = q(embedding_column), q(where.version_column), q(where.key)
    keys = [r["k"] for r in plpy.execute(plpy.prepare(
        f"SELECT {K}::pg_catalog.text AS k FROM {T} WHERE {G} IS NOT NULL AND ({E} IS NULL OR {V} IS DISTINCT FROM"
        " $1::pg_catalog.int8)", ["int8"]), [ref.model_id])]
    return plpy.execute(plpy.prepare("SELECT pgtraj._queue_add($1, $2) AS n", ["text", "text[]"]), [name, keys])[0]["n"]


def drop_target(plpy, name: str) -> None:
    rows = plpy.execute(plpy.prepare("SELECT table_name::pg_catalog.oid AS oid FROM pgtraj.embedding_targets"
                                     " WHERE name = $1", ["text"]), [name])
    if not rows.nrows():
        raise InferenceError(f"no embedding target named {name!r}", sqlstate="42704",
                             hint="SELECT name FROM pgtraj.embedding_targets lists them")
    table = plpy.execute(plpy.prepare("SELECT $1::pg_catalog.regclass::pg_catalog.text AS t", ["oid"]),
                         [rows[0]["oid"]])[0]["t"]
    if citus_kind(plpy, rows[0]["oid"]) == "distributed":
        plpy.execute("SELECT pg_catalog.set_config('citus.enable_unsafe_triggers', 'on', true)")
    for suffix in ("insert", "update", "stale"):  # with the caller's rights: only the table's owner drops triggers
        plpy.execute(f"DROP TRIGGER IF EXISTS {plpy.quote_ident(f'pgtraj_{name}_{suffix}')} ON {table}")
    plpy.execute(plpy.prepare("SELECT pgtraj._target_remove($1)", ["text"]), [name])


def _target(plpy, name: str) -> dict | None:
    rows = plpy.execute(plpy.prepare("SELECT name, table_name::pg_catalog.oid AS oid, traj_column, embedding_column,"
                                     " model, batch_size, max_attempts, paused, aspect FROM pgtraj.embedding_targets"
                                     " WHERE name = $1", ["text"]), [name])
    return dict(rows[0]) if rows.nrows() else None


def process_queue(plpy, name: str | None, max_batches: int | None) -> dict:
    """Drain the queue of one target, or of every target that is not paused and that this role may fill
    (others are skipped with a NOTICE)."""
    begin_procedure(plpy, "pgtraj.process_queue")
    if name is not None:
        if _target(plpy, name) is None:
            raise InferenceError(f"no embedding target named {name!r}", sqlstate="42704",
                                 hint="SELECT name FROM pgtraj.embedding_targets lists them")
        names = [name]
    else:  # the targets of tables this role may read (row security hides the others)
        names = [r["name"] for r in plpy.execute("SELECT name FROM pgtraj.embedding_targets ORDER BY name")]
    out = {}
    for n in names:
        t = _target(plpy, n)
        if t["paused"]:
            plpy.notice(f"pgtraj.process_queue: target {n} is paused (SELECT pgtraj.resume_embedding('{n}'))")
            continue
        may = plpy.execute(plpy.prepare(
            "SELECT pg_catalog.has_column_privilege($1::pg_catalog.oid, $2, 'UPDATE') AS ok", ["oid", "name"]),
            [t["oid"], t["embedding_column"]])[0]["ok"]
        if not may and name is None:
            plpy.notice(f"pgtraj.process_queue: skipping target {n}: this role may not write its column")
            continue
        out[n] = _drain(plpy, t, max_batches)
    return out


def _drain(plpy, t: dict, max_batches: int | None) -> dict:
    q = plpy.quote_ident
    table = plpy.execute(plpy.prepare("SELECT $1::pg_catalog.regclass::pg_catalog.text AS t", ["oid"]),
                         [t["oid"]])[0]["t"]
    where = describe(plpy, table, t["traj_column"], t["embedding_column"])
    ref = resolve(plpy, t["model"], "encoder")
    check_dimensions(plpy, ref, where, t["aspect"])
    if citus_kind(plpy, where.oid) == "distributed":
        return _refresh_shards(plpy, t, where, ref)
    K, E, V = q(where.key), q(t["embedding_column"]), q(where.version_column)
    take = plpy.prepare("SELECT key, attempts FROM pgtraj._queue_take($1, $2)", ["text", "int4"])
    update = plpy.prepare(f"UPDATE {where.sql} AS t SET {E} = u.e::{where.vector}, {V} = $1 FROM ROWS FROM ("
                          f"pg_catalog.unnest($2::pg_catalog.text[]), pg_catalog.unnest($3::pg_catalog.text[])) AS u(k, e)"
                          f" WHERE t.{K} = u.k::{where.key_type}", ["int8", "text[]", "text[]"])
    clear = plpy.prepare(f"UPDATE {where.sql} SET {E} = NULL, {V} = NULL"
                         f" WHERE {K} = ANY ($1::pg_catalog.text[]::{where.key_type}[])", ["text[]"])
    finish = plpy.prepare("SELECT pgtraj._queue_done($1, $2, $3, $4, $5, $6, $7, $8)",
                          ["text", "int8", "text[]", "text[]", "text[]", "text[]", "text[]", "text[]"])
    reader = Reader(plpy, where)
    job = Job(plpy, "refresh", where, t["model"], ref, None, {}, target=t["name"])
    state = {"embedded": 0, "retrying": 0, "failed": 0, "removed": 0, "batches": 0}
    try:
        while max_batches is None or state["batches"] < max_batches:
            queued = plpy.execute(take, [t["name"], t["batch_size"]])
            if not queued.nrows():
                break
            attempts = {r["key"]: r["attempts"] for r in queued}
            rows, unreadable = reader.read(list(attempts))
            gone = [k for k in attempts if k not in rows and k not in unreadable]  # the row was deleted
            nulls = [k for k, w in rows.items() if w is None]                      # its trajectory was set to NULL
            todo = [k for k, w in rows.items() if w is not None]
            embs, errors = encoder.embed_rows(plpy, [rows[k] for k in todo], ref, labels=todo, skip_errors=True,
                                              aspect=t["aspect"])
            ok = [k for k, e in zip(todo, embs) if e is not None]
            plpy.execute(update, [ref.model_id, ok, [e for e in embs if e is not None]])
            if nulls:
                plpy.execute(clear, [nulls])
            bad = {**unreadable, **{todo[i]: (e.sqlstate, e.message) for i, e in errors.items()}}
            final = [k for k in bad if attempts[k] + 1 >= t["max_attempts"]]
            again = [k for k in bad if attempts[k] + 1 < t["max_attempts"]]
            plpy.execute(finish, [t["name"], ref.model_id, ok + gone + nulls, again, [bad[k][1] for k in again],
                                  final, [bad[k][0] for k in final], [bad[k][1] for k in final]])
            state["embedded"] += len(ok)
            state["retrying"] += len(again)
            state["failed"] += len(final)
            state["removed"] += len(gone) + len(nulls)
            state["batches"] += 1
            state["seconds"] = round(time.perf_counter() - job.t0, 3)
            job.update(state["embedded"], state)
            plpy.commit()
            plpy.notice(f"pgtraj.process_queue {t['name']}: {state['embedded']} embedded, {state['retrying']} to"
                        f" retry, {state['failed']} failed")
    except BaseException as exc:
        job.fail(exc)
        raise
    job.update(state["embedded"], state, "succeeded", total=state["embedded"])
    plpy.commit()
    return state


def _refresh_shards(plpy, t: dict, where, ref) -> dict:
    """A target on a Citus distributed table: its rows without a current embedding (new, changed, or made
    by another model version) embedded on the workers, shard by shard, in the batches embed_table runs
    there. A row that fails is recorded in pgtraj.embedding_errors (attempts counted) and tried again on
    the next run: no backoff, as the workers do not see the coordinator's queue."""
    busy = InferenceError(f"pgtraj.embed_table or process_queue is filling {where.sql}.{where.emb}", sqlstate="55P03",
                          hint="SELECT * FROM pgtraj.job_status WHERE status = 'running' shows it")
    with advisory_lock(plpy, "pgtraj.embed_table", f"{where.oid}.{where.emb}", busy):
        total = count_stale(plpy, where, ref, True)
        job = Job(plpy, "refresh", where, t["model"], ref, total, {"distributed": True}, target=t["name"])
        try:
            run_shards(plpy, job, ref, where, total, t["batch_size"], t["aspect"])
        except BaseException as exc:
            job.fail(exc)
            raise
    return job.state
