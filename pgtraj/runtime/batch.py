"""Batch embedding inside PostgreSQL: ``CALL pgtraj.embed_table(...)``, and what it shares with the refresh
queue (runtime/queue.py): the checked description of a table to fill, reading a batch so that one bad row
is set aside rather than failing the batch, and the job row's lifecycle.

Fills a pgvector column in batches, incrementally: only rows whose embedding is missing or was made by
another model version (the ``<embedding column>_model`` column says which) are embedded. Every batch is
committed on its own, so an interrupted run (cancel, crash, timeout) keeps what it finished and the next
run picks up the rest. A row that cannot be embedded, whatever the reason (unusable geometry, an SRID
PostGIS does not know, a time no calendar has), is recorded in pgtraj.embedding_errors under its key and
skipped; the others in its batch are kept. Progress goes to NOTICEs and to the job's row in pgtraj.jobs.

With ``workers => n`` the stale keys are cut into key ranges (pgtraj.job_parts) that n backends take one at
a time: the caller's and n - 1 pg_cron sessions of the caller's role (``pgtraj._embed_part``), each
committing its batches with its part's cursor; a part whose backend is gone is taken over from there.

On a Citus distributed table the same batches run on the workers (``pgtraj._embed_node``: each node
embeds the shards it holds, so no trajectory travels to the coordinator), one backend per node and the
nodes in parallel, in rounds of a few seconds; the coordinator keeps the job row and the failed rows, and
each shard keeps its own key cursor from round to round.

Procedures that commit cannot pin search_path with a SET clause, so every name in the SQL below is
qualified (pg_catalog., pgtraj., the extension's schema): nothing a role plants on the caller's
search_path is ever called from here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from pgtraj.core.aspects import dimension
from pgtraj.runtime.models import Ref
from pgtraj.runtime.server import InferenceError, advisory_lock, sqlstate_of
from pgtraj.runtime.tasks import encoder

TRAJECTORY_TYPES = ("geometry", "tgeompoint")
# SQLSTATE classes that are about the statement or the session (cancel, shutdown, resources, locks,
# privileges, transaction state), never about one row: they end the job instead of being recorded
_NOT_ROW_CLASSES = ("08", "25", "28", "2D", "3B", "40", "42", "44", "53", "55", "57", "58")
_schemas: dict[str, str] = {}


def extension_schema(plpy, extension: str) -> str:
    """The quoted schema of an installed extension, for qualified names of its types."""
    if extension not in _schemas:
        rows = plpy.execute(plpy.prepare(
            "SELECT pg_catalog.quote_ident(n.nspname) AS s FROM pg_catalog.pg_extension e"
            " JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = $1", ["name"]), [extension])
        if not rows.nrows():
            raise InferenceError(f"extension {extension} is not installed in this database", sqlstate="42704")
        _schemas[extension] = rows[0]["s"]
    return _schemas[extension]


def begin_procedure(plpy, what: str) -> None:
    """What a committing procedure checks first: it is not inside a transaction block (it could not commit
    its batches) and the server is not a read-only standby."""
    try:
        plpy.commit()  # nothing to commit yet; refused inside BEGIN ... COMMIT
    except plpy.SPIError as exc:
        if sqlstate_of(exc) != "2D000":
            raise
        raise InferenceError(f"{what} commits as it goes, so it cannot run inside a transaction block",
                             sqlstate="2D000",
                             hint="CALL it on its own (autocommit), not between BEGIN and COMMIT") from None
    if plpy.execute("SELECT pg_catalog.pg_is_in_recovery() AS r")[0]["r"]:
        raise InferenceError(f"cannot run {what} on a hot standby (this server is read-only)", sqlstate="25006",
                             hint="run it on the primary; a standby serves embed, predict_*, score and similar")


def resolve(plpy, model: str, kind: str) -> Ref:
    r = plpy.execute(plpy.prepare("SELECT * FROM pgtraj._resolve($1, $2)", ["text", "text"]), [model, kind])[0]
    return Ref(r["model_id"], kind, r["sha256"], r["meta_sha256"], r["threads"])


@dataclass
class Table:
    """A table to fill, checked: its OID, its name as SQL (regclass output, quoted and qualified as this
    session needs), its single-column primary key and the trajectory and vector columns."""

    oid: int
    sql: str
    key: str
    key_type: str
    traj: str
    emb: str
    emb_typmod: int
    vector: str  # the vector type, qualified

    @property
    def version_column(self) -> str:
        return f"{self.emb}_model"


def _columns(plpy, oid: int) -> dict:
    rows = plpy.execute(plpy.prepare(
        "SELECT a.attname AS name, t.typname AS type, a.atttypmod AS typmod,"
        " pg_catalog.format_type(a.atttypid, a.atttypmod) AS full"
        " FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid"
        " WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped", ["oid"]), [oid])
    return {r["name"]: dict(r) for r in rows}


def primary_key(plpy, oid: int, table: str) -> tuple[str, str]:
    """The single-column primary key of a table and its type as SQL (pgtraj._primary_key: 42P10 without)."""
    row = plpy.execute(plpy.prepare("SELECT name, type FROM pgtraj._primary_key($1::pg_catalog.oid::pg_catalog.regclass)",
                                    ["oid"]), [oid])[0]
    return row["name"], row["type"]


def resolve_table(plpy, source: str) -> tuple[int, str]:
    """The oid of a table named by the caller, and its name as regclass prints it in this session; an
    unknown table raises 42P01 from the cast."""
    row = plpy.execute(plpy.prepare("SELECT $1::pg_catalog.regclass::pg_catalog.oid AS oid,"
                                    " $1::pg_catalog.regclass::pg_catalog.text AS t", ["text"]), [source])[0]
    return row["oid"], row["t"]


def describe(plpy, source: str, traj_column: str, embedding_column: str) -> Table:
    """Where embeddings go, checked; raises InferenceError naming what does not fit."""
    oid, table = resolve_table(plpy, source)
    cols = _columns(plpy, oid)
    for name in (traj_column, embedding_column):
        if name not in cols:
            raise InferenceError(f"column {name!r} of {table} does not exist", sqlstate="42703")
    traj, emb = cols[traj_column], cols[embedding_column]
    if traj["type"] not in TRAJECTORY_TYPES:
        raise InferenceError(f"{table}.{traj_column} is {traj['full']}, not a trajectory", sqlstate="42804",
                             hint="a geometry (LINESTRING M, M = epoch seconds) or tgeompoint column")
    if emb["type"] != "vector":
        raise InferenceError(f"{table}.{embedding_column} is {emb['full']}, not a pgvector vector", sqlstate="42804",
                             hint=f"ALTER TABLE {table} ADD COLUMN {plpy.quote_ident(embedding_column)} vector")
    key, key_type = primary_key(plpy, oid, table)
    return Table(oid, table, key, key_type, traj_column, embedding_column, emb["typmod"],
                 extension_schema(plpy, "vector") + ".vector")


def check_dimensions(plpy, ref: Ref, where: Table, aspect: str = "route") -> None:
    """The model's embeddings (of ``aspect``) fit the vector column. The registry's embedding_dim was checked
    against the graph when it was stored (graphs.check_artifact), so no session is loaded here: on Citus this
    runs on the coordinator, which embeds nothing itself."""
    from pgtraj.runtime import models

    width = plpy.execute(plpy.prepare("SELECT embedding_dim FROM pgtraj.model_registry WHERE id = $1", ["int8"]),
                         [ref.model_id])[0]["embedding_dim"]
    if width is None:
        width = models.session(plpy, ref)[1].get_outputs()[0].shape[1]
    dim = dimension(width, aspect)
    if where.emb_typmod > 0 and where.emb_typmod != dim:
        raise InferenceError(f"model {models.label(plpy, ref.model_id)} embeds in {dim} dimensions but"
                             f" {where.sql}.{where.emb} is vector({where.emb_typmod})", sqlstate="42804",
                             hint=f"ALTER TABLE {where.sql} ALTER COLUMN {plpy.quote_ident(where.emb)} TYPE"
                                  f" vector({dim}) USING NULL, or use a model of that size")


def ensure_version_column(plpy, where: Table) -> None:
    """The <embedding column>_model column (bigint): the model version of each embedding."""
    if where.version_column in _columns(plpy, where.oid):
        return
    plpy.notice(f"pgtraj: adding column {where.version_column} to {where.sql} (the model version of each"
                " embedding, so that refreshes redo only stale rows)")
    plpy.execute(f"ALTER TABLE {where.sql} ADD COLUMN IF NOT EXISTS {plpy.quote_ident(where.version_column)}"
                 " pg_catalog.int8")


class Reader:
    """Reads trajectories of a batch of keys as WKB. A row whose trajectory cannot even be turned into WKB
    (PostGIS or MobilityDB refusing it) fails the batch query; the batch is then read key by key, and each
    key that fails is set aside with the error it raised, so that one bad row never stalls a batch."""

    def __init__(self, plpy, where: Table):
        q = plpy.quote_ident
        K, G, kt = q(where.key), q(where.traj), where.key_type
        self.plpy = plpy
        self.many = plpy.prepare(f"SELECT {K}::pg_catalog.text AS key, pgtraj._wkb({G}) AS w FROM {where.sql}"
                                 f" WHERE {K} = ANY ($1::pg_catalog.text[]::{kt}[])", ["text[]"])
        self.one = plpy.prepare(f"SELECT {K}::pg_catalog.text AS key, pgtraj._wkb({G}) AS w FROM {where.sql}"
                                f" WHERE {K} = $1::pg_catalog.text::{kt}", ["text"])

    def read(self, keys: list[str]) -> tuple[dict, dict]:
        """{key: WKB or None} of the keys still in the table, and {key: (sqlstate, message)} of those that
        could not be read."""
        try:
            return {r["key"]: r["w"] for r in self.plpy.execute(self.many, [keys])}, {}
        except self.plpy.SPIError as exc:
            if not _about_a_row(exc):
                raise
        rows, failed = {}, {}
        for k in keys:
            try:
                for r in self.plpy.execute(self.one, [k]):
                    rows[r["key"]] = r["w"]
            except self.plpy.SPIError as exc:
                if not _about_a_row(exc):
                    raise
                failed[k] = (sqlstate_of(exc) or "XX000", f"trajectory {k!r}: {exc.args[0] if exc.args else exc}")
        return rows, failed


def message_of(exc: BaseException) -> str:
    return str(getattr(exc, "message", None) or (exc.args[0] if exc.args else exc))


def _about_a_row(exc) -> bool:
    return (sqlstate_of(exc) or "XX000")[:2] not in _NOT_ROW_CLASSES


class Job:
    """A row of pgtraj.jobs, written through pgtraj._job_start/_job_update (which only this backend may
    update), for embed_table and the refresh workers alike."""

    def __init__(self, plpy, kind: str, where: Table, model: str, ref: Ref, total: int | None, details: dict,
                 target: str | None = None):
        self.plpy, self.kind, self.state, self.done = plpy, kind, {}, 0
        self.id = plpy.execute(plpy.prepare(
            "SELECT pgtraj._job_start($1, $2::pg_catalog.oid::pg_catalog.regclass, $3, $4, $5, $6, $7, $8) AS id",
            ["text", "oid", "name", "text", "int8", "int8", "jsonb", "text"]),
            [kind, where.oid, where.emb, model, ref.model_id, total, json.dumps(details), target])[0]["id"]
        plpy.commit()  # visible as running from now on
        self.t0 = time.perf_counter()

    def update(self, done: int, state: dict, status: str | None = None, error: str | None = None,
               total: int | None = None) -> None:
        self.done, self.state = done, state
        self.plpy.execute(self.plpy.prepare("SELECT pgtraj._job_update($1, $2, $3, $4, $5, $6)",
                                            ["int8", "int8", "jsonb", "text", "text", "int8"]),
                          [self.id, done, json.dumps(state), status, error, total])

    def fail(self, exc: BaseException) -> None:
        """After an error: the open batch is lost, the committed ones stay; the job row says which error."""
        self.plpy.rollback()
        cancelled = sqlstate_of(exc) == "57014"
        self.update(self.done, self.state, "cancelled" if cancelled else "failed", message_of(exc)[:4000])
        self.plpy.commit()


def embed_table(plpy, source: str, traj_column: str, embedding_column: str, model: str, batch_size: int,
                aspect: str = "route", workers: int = 1) -> dict:
    begin_procedure(plpy, "pgtraj.embed_table")
    if not 1 <= batch_size <= 100_000:
        raise InferenceError(f"batch_size must be from 1 to 100000, not {batch_size}", sqlstate="22023")
    if workers is None or not 1 <= workers <= 64:
        raise InferenceError(f"workers must be from 1 to 64, not {workers}", sqlstate="22023")
    encoder.check_aspect(aspect)
    where = describe(plpy, source, traj_column, embedding_column)
    ref = resolve(plpy, model, "encoder")
    check_dimensions(plpy, ref, where, aspect)
    busy = InferenceError(f"another pgtraj.embed_table is filling {where.sql}.{embedding_column}", sqlstate="55P03",
                          hint="SELECT * FROM pgtraj.job_status WHERE status = 'running' shows it")
    with advisory_lock(plpy, "pgtraj.embed_table", f"{where.oid}.{embedding_column}", busy):
        ensure_version_column(plpy, where)
        plpy.commit()  # the new column's lock released: on Citus, other backends count and fill the shards
        distributed = citus_kind(plpy, where.oid) == "distributed"
        if distributed and workers > 1:
            raise InferenceError(f"workers => {workers} fills a table on one server; {where.sql} is distributed,"
                                 " and embed_table already embeds it on every Citus worker at once",
                                 sqlstate="0A000", hint="CALL pgtraj.embed_table without workers")
        if workers > 1 and not plpy.execute("SELECT pg_catalog.to_regnamespace('cron') IS NOT NULL AS ok")[0]["ok"]:
            raise InferenceError(f"workers => {workers} starts pg_cron sessions, and pg_cron is not enabled in this"
                                 " database", sqlstate="0A000",
                                 hint="CALL pgtraj.embed_table without workers, or in the database named by"
                                      " cron.database_name")
        total = count_stale(plpy, where, ref, distributed)
        job = Job(plpy, "embed_table", where, model, ref, total,
                  {"traj_column": traj_column, "batch_size": batch_size, "aspect": aspect, "workers": workers,
                   "table_oid": where.oid})
        try:
            if distributed:
                run_shards(plpy, job, ref, where, total, batch_size, aspect)
            elif workers > 1:
                _run_parts(plpy, job, ref, where, total, batch_size, aspect, workers)
            else:
                _run(plpy, job, ref, where, total, batch_size, aspect)
        except BaseException as exc:
            job.fail(exc)
            raise
        return {"job": job.id, "total": total, **job.state}


def _stale(plpy, where: Table, version: str = "$1") -> str:
    """Rows to embed: a trajectory, and no embedding or one by another model version than ``version``."""
    E, V, G = plpy.quote_ident(where.emb), plpy.quote_ident(where.version_column), plpy.quote_ident(where.traj)
    return f"{G} IS NOT NULL AND ({E} IS NULL OR {V} IS DISTINCT FROM {version}::pg_catalog.int8)"


def count_stale(plpy, where: Table, ref: Ref, distributed: bool) -> int:
    """How many rows the job has to embed. A distributed table is counted shard by shard
    (run_command_on_shards), so that a node that is down does not stop the ones that are up: its rows are
    left out of the total, and the job, once the others are done, fails naming it."""
    if not distributed:
        return plpy.execute(plpy.prepare(f"SELECT pg_catalog.count(*) AS n FROM {where.sql} WHERE {_stale(plpy, where)}",
                                         ["int8"]), [ref.model_id])[0]["n"]
    # format() fills in each shard's name for %s; a % in a column name is doubled to stay itself
    command = f"SELECT pg_catalog.count(*) FROM %s WHERE {_stale(plpy, where, str(int(ref.model_id))).replace('%', '%%')}"
    return plpy.execute(plpy.prepare("SELECT coalesce(sum(result::pg_catalog.int8) FILTER (WHERE success), 0) AS n"
                                     " FROM pg_catalog.run_command_on_shards($1::pg_catalog.oid::pg_catalog.regclass, $2)",
                                     ["oid", "text"]), [where.oid, command])[0]["n"]


class Batches:
    """The batches of one table (or one shard of it): the next stale keys after a cursor, each batch read,
    embedded and written back in place; what could not be embedded comes back as {key: (sqlstate, message)}."""

    def __init__(self, plpy, where: Table, ref: Ref, aspect: str):
        q = plpy.quote_ident
        T, K, E, V = where.sql, q(where.key), q(where.emb), q(where.version_column)
        self.plpy, self.ref, self.aspect, self.reader, self.where = plpy, ref, aspect, Reader(plpy, where), where
        self.plans: dict[tuple[bool, bool], object] = {}
        self.update = plpy.prepare(f"UPDATE {T} AS t SET {E} = u.e::{where.vector}, {V} = $1 FROM ROWS FROM ("
                                   f"pg_catalog.unnest($2::pg_catalog.text[]), pg_catalog.unnest($3::pg_catalog.text[]))"
                                   f" AS u(k, e) WHERE t.{K} = u.k::{where.key_type}", ["int8", "text[]", "text[]"])

    def next(self, after: str | None, size: int, upto: str | None = None) -> list[str]:
        """The next ``size`` stale keys above ``after`` and up to ``upto`` (None: no bound)."""
        bounds = (after is not None, upto is not None)
        if bounds not in self.plans:  # a plan per bound present, so that each is an index range, never a filter
            K, typ = self.plpy.quote_ident(self.where.key), self.where.key_type
            where = [_stale(self.plpy, self.where)] + [f"{K} > $2::{typ}"] * bounds[0] + [f"{K} <= $4::{typ}"] * bounds[1]
            self.plans[bounds] = self.plpy.prepare(
                f"SELECT {K}::pg_catalog.text AS key FROM {self.where.sql} WHERE {' AND '.join(where)} ORDER BY {K}"
                " LIMIT $3", ["int8", "text", "int4", "text"])
        return [r["key"] for r in self.plpy.execute(self.plans[bounds], [self.ref.model_id, after, size, upto])]

    def embed(self, batch: list[str]) -> tuple[list[str], dict]:
        rows, unreadable = self.reader.read(batch)
        todo = [k for k in batch if rows.get(k) is not None]
        embs, errors = encoder.embed_rows(self.plpy, [rows[k] for k in todo], self.ref, labels=todo, skip_errors=True,
                                          aspect=self.aspect)
        ok = [k for k, e in zip(todo, embs) if e is not None]
        self.plpy.execute(self.update, [self.ref.model_id, ok, [e for e in embs if e is not None]])
        return ok, {**unreadable, **{todo[i]: (e.sqlstate, e.message) for i, e in errors.items()}}


class Errors:
    """Writes a step's outcome to pgtraj.embedding_errors: keys that worked leave it, failures are recorded."""

    def __init__(self, plpy, where: Table, ref: Ref):
        self.plpy, self.where, self.ref = plpy, where, ref
        self.plan = plpy.prepare("SELECT pgtraj._record_errors($1::pg_catalog.oid::pg_catalog.regclass, $2, $3, $4,"
                                 " $5, $6, $7)", ["oid", "name", "int8", "text[]", "text[]", "text[]", "text[]"])

    def record(self, ok: list[str], bad: dict) -> None:
        self.plpy.execute(self.plan, [self.where.oid, self.where.emb, self.ref.model_id, ok, list(bad),
                                      [s for s, _ in bad.values()], [m for _, m in bad.values()]])


class Progress:
    """What the coordinator of a run keeps: counts, failed rows recorded, the job row and a NOTICE per step."""

    def __init__(self, plpy, job: Job, ref: Ref, where: Table, total: int):
        self.plpy, self.job, self.where, self.total = plpy, job, where, total
        self.done = self.failed = self.batches = 0
        self.errors = Errors(plpy, where, ref)

    def add(self, ok: list[str], bad: dict, batches: int = 1) -> None:
        """One step's results, committed with the job row (its batches are safe from here on)."""
        self.errors.record(ok, bad)
        self.report(self.done + len(ok), self.failed + len(bad), self.batches + batches)

    def report(self, done: int, failed: int, batches: int, **more) -> None:
        """The counts so far into the job row, committed, and a NOTICE."""
        self.done, self.failed, self.batches = done, failed, batches
        elapsed = time.perf_counter() - self.job.t0
        state = {"embedded": done, "failed": failed, "batches": batches, "seconds": round(elapsed, 3),
                 "rows_per_second": round(done / elapsed, 1) if elapsed > 0 else None, **more}
        self.job.update(done + failed, state)
        self.plpy.commit()
        sessions = f", {more['sessions']} of {more['workers']} backends" if "sessions" in more else ""
        what = "pgtraj.process_queue" if self.job.kind == "refresh" else "pgtraj.embed_table"
        self.plpy.notice(f"{what} {self.where.sql}.{self.where.emb}: {done + failed}/{self.total}"
                         f" rows ({state['rows_per_second']} rows/s{sessions}){f', {failed} failed' if failed else ''}")


def _run(plpy, job: Job, ref: Ref, where: Table, total: int, batch_size: int, aspect: str) -> None:
    batches, progress, last = Batches(plpy, where, ref, aspect), Progress(plpy, job, ref, where, total), None
    while batch := batches.next(last, batch_size):
        progress.add(*batches.embed(batch))
        last = batch[-1]
    _finish(plpy, job, progress.failed, where)


def citus_kind(plpy, oid: int) -> str | None:
    """'distributed', 'reference' or 'local' for a table Citus manages, None otherwise (pgtraj._citus_kind)."""
    return plpy.execute(plpy.prepare("SELECT pgtraj._citus_kind($1::pg_catalog.oid::pg_catalog.regclass) AS k",
                                     ["oid"]), [oid])[0]["k"]


def run_shards(plpy, job: Job, ref: Ref, where: Table, total: int, batch_size: int, aspect: str) -> None:
    """Rounds of about NODE_ROUND_SECONDS of batches on every worker at once (run_command_on_workers: each
    node, in a backend of its own, works through the shards it holds: pgtraj._embed_node), until a round
    finds nothing left. Each shard keeps its own key cursor from round to round. A node that cannot be
    reached is tried again each round while the others go on; once they are done, the job fails naming it,
    and what every node committed stays."""
    q = plpy.quote_literal
    r = plpy.execute(plpy.prepare(
        "SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname) AS qualified"
        " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
        ["oid"]), [where.oid])[0]  # the table by name: a worker's OIDs are its own
    r["label"] = exact_label(plpy, ref.model_id)
    run = plpy.prepare("SELECT nodename || ':' || nodeport AS node, success, result"
                       " FROM pg_catalog.run_command_on_workers($1)", ["text"])
    progress, cursors = Progress(plpy, job, ref, where, total), {}
    while True:
        command = (f"CALL pgtraj._embed_node({q(r['qualified'])}, {q(where.traj)}, {q(where.emb)}, {q(r['label'])},"
                   f" {batch_size}, {q(aspect)}, {q(json.dumps(cursors))}, {NODE_ROUND_SECONDS})")
        ok, bad, batches, lost = [], {}, 0, []
        for row in plpy.execute(run, [command]):
            if not row["success"]:
                lost.append((row["node"], row["result"]))
                continue
            out = json.loads(row["result"])
            cursors.update(out["cursors"])
            ok += out["embedded"]
            bad.update({k: tuple(v) for k, v in out["failed"].items()})
            batches += out["batches"]
        if batches:
            progress.add(ok, bad, batches)
        else:
            break
    if lost:
        node, error = lost[0]
        more = f" (and {len(lost) - 1} more node(s))" if len(lost) > 1 else ""
        raise InferenceError(f"Citus worker {node}{more} could not embed its shards of {where.sql}: {error}",
                             sqlstate="08006", hint="the batches committed so far are kept: bring the node back"
                                                    " and CALL pgtraj.embed_table again to finish")
    _finish(plpy, job, progress.failed, where)


def exact_label(plpy, model_id: int) -> str:
    """name@version of a registered model: the very version resolved by the backend that started a job, for
    the other backends that work on it."""
    return plpy.execute(plpy.prepare("SELECT m.name || '@' || m.version AS label FROM pgtraj.model_registry m"
                                     " WHERE m.id = $1", ["int8"]), [model_id])[0]["label"]


# embed_table(..., workers => n) cuts the stale keys into this many parts per backend, so that a backend
# that is done early (or starts late: pg_cron before 1.5 starts jobs at the next minute) takes more of them
PARTS_PER_WORKER = 4
# how long the caller's backend leaves a pg_cron session's parts to it before taking them over itself
PARTS_GRACE_SECONDS = 75


def _run_parts(plpy, job: Job, ref: Ref, where: Table, total: int, batch_size: int, aspect: str,
               workers: int) -> None:
    """embed_table with ``workers`` backends: this one and workers - 1 pg_cron sessions as the caller
    (pgtraj._embed_part), each taking key-range parts of the stale rows (pgtraj._part_claim) and committing
    its batches with the part's cursor. This backend works parts too, keeps the job row and the NOTICEs, and
    takes over parts whose session is gone or never came; the sessions are unscheduled when the job ends."""
    K = plpy.quote_ident(where.key)
    n = workers * PARTS_PER_WORKER
    cut = plpy.execute(plpy.prepare(  # the stale keys' quantiles: parts of about equal row counts
        f"SELECT pg_catalog.percentile_disc($2::pg_catalog.float8[]) WITHIN GROUP (ORDER BY {K})::pg_catalog.text[]"
        f" AS b FROM {where.sql} WHERE {_stale(plpy, where)}", ["int8", "float8[]"]),
        [ref.model_id, [i / n for i in range(1, n)]])[0]["b"]
    bounds = list(dict.fromkeys(b for b in cut or [] if b is not None))
    plpy.execute(plpy.prepare("SELECT pgtraj._parts_plan($1, $2, $3)", ["int8", "text[]", "int4"]),
                 [job.id, bounds, workers])
    slots = plpy.execute(plpy.prepare("SELECT pgtraj._schedule_parts($1) AS n", ["int8"]), [job.id])[0]["n"]
    plpy.commit()  # pg_cron sees its jobs, the sessions see the parts
    progress, work = Progress(plpy, job, ref, where, total), Batches(plpy, where, ref, aspect)
    status = plpy.prepare("SELECT * FROM pgtraj._parts_progress($1)", ["int8"])
    reported = 0.0

    def report(force: bool = False) -> dict:
        nonlocal reported
        p = plpy.execute(status, [job.id])[0]
        if force or time.perf_counter() - reported >= 1.0:
            progress.report(p["embedded"], p["failed"], p["batches"], sessions=p["sessions"], workers=workers)
            reported = time.perf_counter()
        return p

    try:
        parts = Parts(plpy, job.id, 0, PARTS_GRACE_SECONDS)
        while True:
            part = parts.claim()
            if part is not None:
                parts.embed(part, work, batch_size, report)
                continue
            p = report()
            if not p["open_parts"]:
                break
            plpy.execute("SELECT pg_catalog.pg_sleep(0.2)")  # the sessions' parts: wait for them or their end
    finally:
        plpy.rollback()  # nothing open on success; the unfinished batch when something went wrong
        unschedule = plpy.prepare("SELECT pgtraj._unschedule($1)", ["text"])
        for s in range(1, slots + 1):
            plpy.execute(unschedule, [f"pgtraj-embed-{job.id}-{s}"])
        plpy.commit()
    p = report(force=True)
    if p["failed_parts"]:
        sqlstate, _, message = (p["error"] or "XX000: unknown").partition(": ")
        raise InferenceError(f"{p['failed_parts']} part(s) of {where.sql} failed in a pg_cron session: {message}",
                             sqlstate=sqlstate, hint="the batches committed so far are kept: CALL pgtraj.embed_table"
                                                     " again to finish")
    if p["sessions"] < workers:
        plpy.notice(f"pgtraj.embed_table: {p['sessions']} of {workers} backends took part (pg_cron starts a"
                    " session within a minute, or a second from pg_cron 1.5 on; a small table may be done first)")
    _finish(plpy, job, progress.failed, where)


class Parts:
    """The parts one backend takes of a job (its ``slot``: 0 the caller, 1.. pg_cron's) and works through,
    batch by batch from the part's cursor, each batch committed with the part's counts."""

    def __init__(self, plpy, job: int, slot: int, grace: float):
        self.plpy, self.job, self.slot, self.grace = plpy, job, slot, grace
        self.take = plpy.prepare("SELECT * FROM pgtraj._part_claim($1, $2, $3 * interval '1 s')",
                                 ["int8", "int4", "float8"])
        self.update = plpy.prepare("SELECT pgtraj._part_update($1, $2, $3, $4, $5, $6, $7) AS go",
                                   ["int8", "int4", "text", "int8", "int8", "text", "text"])

    def claim(self) -> dict | None:
        rows = self.plpy.execute(self.take, [self.job, self.slot, self.grace])
        self.plpy.commit()
        return dict(rows[0]) if rows.nrows() else None

    def embed(self, part: dict, work: Batches, batch_size: int, after_batch=lambda: None) -> bool:
        """The part's batches; False when the job ended meanwhile (the part stays where its cursor is)."""
        errors, last = Errors(self.plpy, work.where, work.ref), part["cursor"] or part["after_key"]
        while batch := work.next(last, batch_size, part["last_key"]):
            ok, bad = work.embed(batch)
            errors.record(ok, bad)
            go = self.plpy.execute(self.update, [self.job, part["part"], batch[-1], len(ok), len(bad), None, None])
            self.plpy.commit()
            last = batch[-1]
            after_batch()
            if not go[0]["go"]:
                return False
        self.end(part, "done")
        return True

    def end(self, part: dict, status: str, error: str | None = None) -> None:
        self.plpy.execute(self.update, [self.job, part["part"], None, 0, 0, status, error])
        self.plpy.commit()


def embed_parts(plpy, job: int, slot: int) -> None:
    """A pg_cron session of embed_table(..., workers => n): the job's parts, its own slot's first, until none
    is left for it. A part that fails for another reason than a row is marked failed with its error (the
    caller's backend reports it); a session that finds its job over unschedules itself."""
    begin_procedure(plpy, "pgtraj._embed_part")
    rows = plpy.execute(plpy.prepare("SELECT args, status FROM pgtraj.jobs WHERE id = $1", ["int8"]), [job])
    parts, work, part = Parts(plpy, job, slot, PARTS_GRACE_SECONDS), None, None
    try:
        while rows.nrows() and rows[0]["status"] == "running" and (part := parts.claim()) is not None:
            if work is None:
                args = json.loads(rows[0]["args"])
                table = plpy.execute(plpy.prepare("SELECT $1::pg_catalog.regclass::pg_catalog.text AS t", ["oid"]),
                                     [args["table_oid"]])[0]["t"]  # as this session names it
                work = Batches(plpy, describe(plpy, table, args["traj_column"], args["embedding_column"]),
                               resolve(plpy, exact_label(plpy, args["model_id"]), "encoder"), args["aspect"])
                batch_size = args["batch_size"]
            if not parts.embed(part, work, batch_size):
                break
            part = None
    except Exception as exc:
        if part is None:
            raise
        plpy.rollback()
        parts.end(part, "failed", f"{sqlstate_of(exc) or 'XX000'}: {message_of(exc)}")
        return
    over = plpy.execute(plpy.prepare("SELECT NOT EXISTS (SELECT 1 FROM pgtraj.jobs WHERE id = $1 AND status ="
                                     " 'running') AS over", ["int8"]), [job])[0]["over"]
    if over:
        plpy.execute(plpy.prepare("SELECT pgtraj._unschedule($1)", ["text"]), [f"pgtraj-embed-{job}-{slot}"])
        plpy.commit()


# how long one round of embed_table keeps each Citus worker at work before it reports back: every round
# is a new backend on each node (run_command_on_workers opens one), which loads the model again
NODE_ROUND_SECONDS = 5.0


def embed_node(plpy, source: str, traj_column: str, embedding_column: str, model: str, batch_size: int,
               aspect: str, cursors: str, seconds: float) -> str:
    """On a Citus worker: batches of the shards of ``source`` this node holds, each committed, for about
    ``seconds`` (at least one batch); each shard from its cursor on (``cursors``, by shard name; false once
    it was found done). Returns, as JSON for the coordinator, the cursors moved on, the keys embedded and
    the failed rows."""
    t0, cursors = time.perf_counter(), json.loads(cursors)
    shards = [r["shard"] for r in plpy.execute(plpy.prepare(
        "SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname || '_' || s.shardid)"
        " AS shard FROM pg_catalog.pg_dist_shard s JOIN pg_catalog.pg_dist_placement p USING (shardid)"
        " JOIN pg_catalog.pg_class c ON c.oid = s.logicalrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE s.logicalrelid = $1::pg_catalog.regclass"
        " AND p.groupid = (SELECT groupid FROM pg_catalog.pg_dist_local_group) ORDER BY s.shardid", ["text"]), [source])]
    ref, moved, ok, bad, batches = resolve(plpy, model, "encoder"), {}, [], {}, 0
    for shard in shards:
        if cursors.get(shard) is False:
            continue
        if time.perf_counter() - t0 >= seconds and batches:
            break
        work = Batches(plpy, describe(plpy, shard, traj_column, embedding_column), ref, aspect)
        last = cursors.get(shard)
        while True:
            batch = work.next(last, batch_size)
            if not batch:
                last = False  # nothing left in this shard
                break
            done, failed = work.embed(batch)
            plpy.commit()
            ok, last, batches = ok + done, batch[-1], batches + 1
            bad.update({k: list(v) for k, v in failed.items()})
            if time.perf_counter() - t0 >= seconds:
                break
        moved[shard] = last
    return json.dumps({"cursors": moved, "embedded": ok, "failed": bad, "batches": batches})


def _finish(plpy, job: Job, failed: int, where: Table) -> None:
    job.update(job.done, job.state, "succeeded")
    plpy.commit()
    if failed:
        plpy.warning(f"pgtraj.embed_table {where.sql}.{where.emb}: {failed} row(s) could not be embedded",
                     hint="SELECT key, error FROM pgtraj.embedding_errors WHERE table_name ="
                          f" {plpy.quote_literal(where.sql)}::regclass")
