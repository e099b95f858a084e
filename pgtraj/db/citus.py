"""pgtraj on a Citus cluster: what `pgtraj install` does differently on a coordinator.

Citus sends what the install creates on the coordinator (extensions, the schema, types, functions, roles,
grants) to every node, in the same distributed transaction, and to each node added later. Tables are the
exception, so the registry's become **reference tables**: a copy on every node, read there without a round
trip, so that a PL/Python function running on a worker (a query over a distributed table pushed down to
its shards, an embed_table shard run) finds its models as it would on one server, and a deploy on the
coordinator is seen by every node at commit. The bookkeeping of batch work (jobs, targets, the queue,
failed rows) stays on the coordinator, where the procedures that write it run.

Two things follow from how Citus connects from node to node, always as the current user:
- pgtraj's SECURITY DEFINER writers run as pgtraj_service, so a registry write reaches the other nodes as
  that role: on Citus it logs in (NOLOGIN elsewhere), with a random password held only in
  pg_dist_authinfo, which only superusers can read, on every node;
- the nodes are checked before anything is created: each worker must have the extensions and a PL/Python
  that imports the same pgtraj runtime at the same path (the functions Citus copies carry that path).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgtraj.core.errors import DatabaseSetupError, MissingExtensionError

# the registry, in foreign-key order (a table before those that reference it)
REFERENCE_TABLES = ("schema_migrations", "installation", "training_runs", "model_registry", "model_artifacts",
                    "deployment_log")
SERVICE_ROLE = "pgtraj_service"


@dataclass(frozen=True)
class Node:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def enabled(cur: psycopg.Cursor) -> bool:
    """Citus is created in this database. Raises on a Citus worker: pgtraj is installed through the
    coordinator, which gives every worker the same objects."""
    cur.execute("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus')")
    if not cur.fetchone()[0]:
        return False
    cur.execute("SELECT pg_catalog.citus_is_coordinator() OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_node)")
    if not cur.fetchone()[0]:
        raise DatabaseSetupError("this database is a Citus worker node; pgtraj is installed on the coordinator",
                                 hint="run `pgtraj install` against the coordinator: it installs on every node")
    return True


def workers(cur: psycopg.Cursor) -> list[Node]:
    cur.execute("SELECT nodename, nodeport FROM pg_catalog.pg_dist_node WHERE groupid > 0 AND noderole = 'primary'"
                " AND isactive ORDER BY nodeid")
    return [Node(h, p) for h, p in cur.fetchall()]


def on_workers(cur: psycopg.Cursor, command: str) -> dict[Node, tuple[bool, str]]:
    """One single-value command on every worker (each in a connection of its own, outside this
    transaction): {node: (succeeded, its value or error)}."""
    cur.execute("SELECT nodename, nodeport, success, result FROM pg_catalog.run_command_on_workers(%s)", [command])
    return {Node(h, p): (ok, result) for h, p, ok, result in cur.fetchall()}


def check_extensions(cur: psycopg.Cursor, requirements) -> None:
    """Every worker has the extensions pgtraj needs, recent enough: the error names the node and what it lacks."""
    from pgtraj.db.install import STACK_HINT, version_tuple

    query = sql.SQL("SELECT coalesce(json_object_agg(name, default_version), '{{}}')"
                    " FROM pg_catalog.pg_available_extensions WHERE name IN ({})").format(
        sql.SQL(", ").join(sql.Literal(r.extension) for r in requirements)).as_string(cur)
    for node, (ok, result) in on_workers(cur, query).items():
        if not ok:
            raise DatabaseSetupError(f"Citus worker {node} cannot be reached from the coordinator: {result}",
                                     hint="start it, or remove it with citus_remove_node, then install again")
        have = json.loads(result)
        for req in requirements:
            if req.optional:
                continue
            if req.extension not in have:
                raise MissingExtensionError(
                    f"Citus worker {node} lacks extension {req.extension} (needed for {req.why})",
                    hint=f"install the stack on that node as on the coordinator: {STACK_HINT}")
            if req.min_version and version_tuple(have[req.extension]) < version_tuple(req.min_version):
                raise MissingExtensionError(
                    f"Citus worker {node} has extension {req.extension} {have[req.extension]}; pgtraj needs"
                    f" {req.min_version} or newer", hint=STACK_HINT)


def probe_workers(cur: psycopg.Cursor, probe_body: str) -> dict[Node, dict]:
    """What PL/Python imports on each worker. run_command_on_workers returns one value per node and a DO
    block returns none, so the probe reports its findings as the text of the error it ends with."""
    block = f"DO LANGUAGE plpython3u $pgtraj_probe$\n{probe_body}\nplpy.error(json.dumps(out))\n$pgtraj_probe$"
    out = {}
    for node, (_, result) in on_workers(cur, block).items():
        try:  # 'ERROR:  plpy.Error: {...}'
            out[node] = json.loads(result[result.index("{"):result.rindex("}") + 1])
        except ValueError:
            raise DatabaseSetupError(f"Citus worker {node}: PL/Python cannot run: {result}",
                                     hint="install postgresql-plpython3-15 on that node") from None
    return out


def make_reference_tables(cur: psycopg.Cursor, log) -> list[str]:
    """The registry's tables as reference tables (once; a no-op on later installs). Citus replaces a table
    it distributes, which views over it would block: pgtraj's own views go first (sql/ creates them again
    in this transaction), and anything of the database's own built on them is named and stops the install."""
    cur.execute("SELECT t::text FROM unnest(%s::pg_catalog.regclass[]) t WHERE NOT EXISTS"
                " (SELECT 1 FROM pg_catalog.pg_dist_partition p WHERE p.logicalrelid = t)",
                [[f"pgtraj.{t}" for t in REFERENCE_TABLES]])
    todo = [t for (t,) in cur.fetchall()]
    if not todo:
        return []
    # a reference table carries no trigger: the graph check moves into pgtraj._register (sql/40_inference.sql)
    cur.execute("DROP TRIGGER IF EXISTS check_artifact ON pgtraj.model_artifacts")
    # a coordinator table with a foreign key to a reference table is taken into Citus' metadata, where the
    # writes of the batch bookkeeping meet Citus' limits; failed rows keep their model id without the key
    cur.execute("ALTER TABLE pgtraj.embedding_errors DROP CONSTRAINT IF EXISTS embedding_errors_model_id_fkey")
    cur.execute("SELECT oid::pg_catalog.regclass::text FROM pg_catalog.pg_class"
                " WHERE relnamespace = 'pgtraj'::pg_catalog.regnamespace AND relkind = 'v'")
    views = [v for (v,) in cur.fetchall()]
    if views:
        cur.execute("""
            SELECT DISTINCT coalesce(v.oid::pg_catalog.regclass::text, p.oid::pg_catalog.regprocedure::text)
              FROM pg_catalog.pg_depend d
              JOIN pg_catalog.pg_class base ON d.refobjid IN (base.oid, base.reltype)
              LEFT JOIN pg_catalog.pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid
              LEFT JOIN pg_catalog.pg_class v ON v.oid = r.ev_class
              LEFT JOIN pg_catalog.pg_proc p ON d.classid = 'pg_proc'::regclass AND p.oid = d.objid
             WHERE base.oid = ANY (%s::pg_catalog.regclass[])
               AND coalesce(v.relnamespace, p.pronamespace) <> 'pgtraj'::pg_catalog.regnamespace""", [views])
        foreign = [o for (o,) in cur.fetchall()]
        if foreign:
            raise DatabaseSetupError(
                f"{', '.join(foreign)} depend(s) on pgtraj's views, which must be re-created while the registry"
                " becomes Citus reference tables", hint="drop them, install, and create them again")
        cur.execute(sql.SQL("DROP VIEW {} CASCADE").format(sql.SQL(", ").join(
            sql.Identifier(*v.split(".")) for v in views)))
    for table in todo:
        cur.execute("SELECT pg_catalog.create_reference_table(%s::pg_catalog.regclass)", [table])
        log(f"Citus: {table} is a reference table (a copy on every node)")
    return todo


def service_login(cur: psycopg.Cursor) -> str:
    """pgtraj_service logs in to every node with a password only pg_dist_authinfo holds: kept from an
    earlier install, else a new random one. Set here on the coordinator (Citus sends ALTER ROLE to every
    node); finish() gives the workers the same entry."""
    cur.execute("SELECT authinfo FROM pg_catalog.pg_dist_authinfo WHERE nodeid = 0 AND rolename = %s", [SERVICE_ROLE])
    row = cur.fetchone()
    authinfo = row[0] if row else f"password={secrets.token_hex(32)}"
    password = authinfo.split("=", 1)[1]
    cur.execute(sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(SERVICE_ROLE), sql.Literal(password)))
    cur.execute("INSERT INTO pg_catalog.pg_dist_authinfo (nodeid, rolename, authinfo) VALUES (0, %s, %s)"
                " ON CONFLICT (rolename, nodeid) DO UPDATE SET authinfo = excluded.authinfo", [SERVICE_ROLE, authinfo])
    return authinfo


def finish(cur: psycopg.Cursor, authinfo: str) -> None:
    """After the install committed: every worker's pg_dist_authinfo has pgtraj_service's entry (Citus does
    not copy that table), so that writes made on a worker reach the other nodes too."""
    command = sql.SQL("INSERT INTO pg_catalog.pg_dist_authinfo (nodeid, rolename, authinfo) VALUES (0, {}, {})"
                      " ON CONFLICT (rolename, nodeid) DO UPDATE SET authinfo = excluded.authinfo").format(
        sql.Literal(SERVICE_ROLE), sql.Literal(authinfo)).as_string(cur)
    for node, (ok, result) in on_workers(cur, command).items():
        if not ok:
            raise DatabaseSetupError(f"Citus worker {node}: could not store pgtraj_service's node login: {result}",
                                     hint="run `pgtraj install` again once the node is reachable")
