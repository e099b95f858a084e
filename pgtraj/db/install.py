"""`pgtraj install`: validate the database side, then apply migrations/ and sql/ in one transaction.

Order of work, all inside a single transaction guarded by an advisory lock (so an interrupted install
leaves nothing half-applied, and concurrent installs run one after the other):

1. the role is a superuser (PL/Python is an untrusted language);
2. every required extension is available on the server at a recent enough version, and is created;
3. PL/Python can import numpy, onnxruntime, h3 and the matching pgtraj runtime;
4. migrations/NNNN_*.sql not yet recorded in pgtraj.schema_migrations are applied, in order;
5. sql/*.sql (functions, views, privileges) are (re)created, with the runtime's path written into every
   PL/Python function (boot_snippet), and the installation row is written.

On a Citus coordinator (db/citus.py) every worker is checked first (extensions, PL/Python), Citus carries
what the install creates to every node, and the registry's tables become reference tables.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from pgtraj import __version__, package_digest
from pgtraj.core.errors import (
    DatabaseSetupError,
    MigrationError,
    MissingExtensionError,
    NotSuperuserError,
    RuntimeImportError,
)
from pgtraj.db import citus
from pgtraj.db.connection import connect
from pgtraj.runtime.boot import path_setup, plpython_body

PACKAGE_DIR = Path(__file__).resolve().parent.parent
INSTALL_LOCK = "pgtraj.install"
PINNED_PATH = "pg_catalog, pgtraj"  # every function's search_path (sql/00_roles.sql)
STACK_HINT = "install the stack with `sudo docker/install-debian.sh` (Debian 12), or see README.md"


@dataclass(frozen=True)
class Requirement:
    extension: str
    min_version: str | None = None
    optional: bool = False
    why: str = ""
    update: bool = False  # brought to the server's newest version by every install (ALTER EXTENSION UPDATE)


REQUIREMENTS = (
    Requirement("postgis", "3.0", why="geometries and LINESTRING M trajectories"),
    Requirement("plpython3u", why="in-database inference"),
    # pgvector's releases since 0.8.0 fix HNSW corruption during vacuum: a database on an older build of it
    # is updated as soon as the server has the newer one (docker/install-debian.sh builds 0.8.6)
    Requirement("vector", "0.8.0", why="embedding columns and HNSW similarity search", update=True),
    Requirement("mobilitydb", "1.3.0", why="tgeompoint trajectories"),
    Requirement("h3", "4.1.0", why="H3 cells in SQL"),
    Requirement("h3_postgis", "4.1.0", why="H3 cells from and to PostGIS geometries"),
    Requirement("pg_cron", "1.4", optional=True, why="scheduled training and embedding refresh"),
)
# lower bounds for what PL/Python imports (the runtime environment pins exact versions)
RUNTIME_MINIMUMS = {"numpy": "1.26", "onnxruntime": "1.17", "h3": "4.1"}


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass
class InstallResult:
    version: str
    extensions: dict[str, str] = field(default_factory=dict)
    applied: list[str] = field(default_factory=list)
    runtime: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def resource_dir(name: str) -> Path:
    """sql/ or migrations/: inside the package when installed from a wheel, beside it in a checkout."""
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"pgtraj's {name}/ directory is missing from {PACKAGE_DIR}")


def load_migrations(directory: Path | None = None) -> list[Migration]:
    out = []
    for f in sorted((directory or resource_dir("migrations")).glob("*.sql")):
        m = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", f.name)
        if not m:
            raise MigrationError(f"migration file name {f.name!r} is not NNNN_name.sql")
        out.append(Migration(m.group(1), m.group(2), f.read_text()))
    return out


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def install(dsn: str, *, python_path: str | None = None, log=print,
            requirements: tuple[Requirement, ...] = REQUIREMENTS,
            migrations: list[Migration] | None = None) -> InstallResult:
    """Install or upgrade pgtraj in the database at ``dsn``. Re-running is safe and cheap."""
    migrations = load_migrations() if migrations is None else migrations
    result = InstallResult(version=__version__)
    with connect(dsn, application_name="pgtraj install") as conn, conn.cursor() as cur:
        check_superuser(cur)
        distributed = citus.enabled(cur)
        nodes = citus.workers(cur) if distributed else []
        if nodes:
            citus.check_extensions(cur, requirements)
            # the worker probe below runs in connections of its own: PL/Python must exist there already
            cur.execute("CREATE EXTENSION IF NOT EXISTS plpython3u")
            conn.commit()
        cur.execute("SET LOCAL client_min_messages = warning")  # no 'already exists, skipping' noise
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [INSTALL_LOCK])
        result.extensions, result.notes = create_extensions(cur, requirements)
        for name, version in result.extensions.items():
            log(f"extension {name} {version}")
        python_path = python_path if python_path is not None else _recorded_python_path(cur)
        result.runtime = probe_runtime(cur, python_path)
        log(f"PL/Python runtime: Python {result.runtime['python']}, numpy {result.runtime['numpy']}, "
            f"onnxruntime {result.runtime['onnxruntime']}, h3 {result.runtime['h3']}")
        python_path = python_path or result.runtime.get("found_at")  # where the server found it, kept
        if nodes:  # the functions Citus copies to the workers carry this path
            for node, info in citus.probe_workers(cur, _PROBE_BODY.replace("@PATH@", path_setup(python_path))).items():
                check_runtime(info, python_path, where=f"Citus worker {node}")
            log(f"Citus: {len(nodes)} worker(s) checked: {', '.join(map(str, nodes))}")
        result.applied = apply_migrations(cur, migrations, log)
        cur.execute(
            """INSERT INTO pgtraj.installation (version, python_path) VALUES (%s, %s)
               ON CONFLICT (singleton) DO UPDATE
               SET version = excluded.version, python_path = excluded.python_path,
                   upgraded_at = excluded.upgraded_at""",  # no function here: Citus refuses them
            [__version__, python_path])
        authinfo = None
        if distributed:
            citus.make_reference_tables(cur, log)
        schemas = extension_schemas(cur)
        # types in signatures resolve here; bodies run under their own pinned search_path
        cur.execute(sql.SQL("SET LOCAL search_path = {}").format(sql.SQL(", ").join(
            sql.Identifier(s) for s in dict.fromkeys(["pg_catalog", "pgtraj", *schemas.values()]))))
        for f in sorted(resource_dir("sql").glob("*.sql")):
            cur.execute(render_sql(f.read_text(), python_path, schemas, citus=distributed))
        if distributed:
            authinfo = citus.service_login(cur)  # its role was made by sql/00_roles.sql
        result.notes += scheduling_notes(cur)
        for note in result.notes:
            log(f"note: {note}")
        conn.commit()
        if authinfo and nodes:
            citus.finish(cur, authinfo)
    log(f"pgtraj {__version__} installed ({len(result.applied)} migration(s) applied)")
    return result


def check_superuser(cur: psycopg.Cursor) -> None:
    cur.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user")
    user, is_super = cur.fetchone()
    if not is_super:
        raise NotSuperuserError(
            f"role {user!r} is not a superuser; installing pgtraj creates PL/Python (untrusted) functions",
            hint="connect as a superuser (e.g. postgres) to install; then grant pgtraj_user or pgtraj_admin "
                 f"to {user}")


def check_extensions(cur: psycopg.Cursor, requirements=REQUIREMENTS) -> tuple[list[Requirement], list[str]]:
    """The requirements that can be created here, and notes about optional ones that cannot."""
    cur.execute("SELECT name, default_version, installed_version FROM pg_available_extensions")
    available = {name: (default, installed) for name, default, installed in cur.fetchall()}
    usable, notes = [], []
    for req in requirements:
        if req.extension not in available:
            if req.optional:
                notes.append(f"optional extension {req.extension} is not installed: no {req.why}")
                continue
            raise MissingExtensionError(
                f"extension {req.extension} is not installed on the database server (needed for {req.why})",
                hint=STACK_HINT)
        default, installed = available[req.extension]
        have = installed or default
        if req.min_version and version_tuple(have) < version_tuple(req.min_version):
            fix = (f"ALTER EXTENSION {req.extension} UPDATE" if installed and
                   version_tuple(default) >= version_tuple(req.min_version) else STACK_HINT)
            raise MissingExtensionError(
                f"extension {req.extension} {have} is {'installed' if installed else 'available'}; "
                f"pgtraj needs {req.min_version} or newer", hint=fix)
        if req.extension == "pg_cron" and not installed:
            reason = _pg_cron_unusable(cur)
            if reason:
                notes.append(f"pg_cron not enabled in this database ({reason}): no {req.why}")
                continue
        usable.append(req)
    return usable, notes


def create_extensions(cur: psycopg.Cursor, requirements=REQUIREMENTS) -> tuple[dict[str, str], list[str]]:
    usable, notes = check_extensions(cur, requirements)
    for req in usable:
        cur.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {} CASCADE").format(
            sql.Identifier(req.extension)))
        if req.update:
            cur.execute("SELECT installed_version, default_version FROM pg_available_extensions WHERE name = %s",
                        [req.extension])
            installed, default = cur.fetchone()
            if version_tuple(installed) < version_tuple(default):
                cur.execute(sql.SQL("ALTER EXTENSION {} UPDATE").format(sql.Identifier(req.extension)))
                notes.append(f"extension {req.extension} updated from {installed} to {default}")
    cur.execute("SELECT extname, extversion FROM pg_extension WHERE extname = ANY(%s)",
                [[r.extension for r in usable]])
    return dict(sorted(cur.fetchall())), notes


def _pg_cron_unusable(cur: psycopg.Cursor) -> str | None:
    cur.execute("""SELECT current_database(), current_setting('cron.database_name', true),
                          current_setting('shared_preload_libraries')""")
    db, cron_db, preload = cur.fetchone()
    if "pg_cron" not in [p.strip() for p in preload.split(",")]:
        return "add pg_cron to shared_preload_libraries and restart the server"
    if (cron_db or "postgres") != db:
        return f"cron.database_name is {cron_db or 'postgres'!r}, this database is {db!r}"
    return None


def render_sql(text: str, python_path: str | None, schemas: dict[str, str], *, citus: bool = False) -> str:
    """sql/*.sql as installed: ``@extschema:NAME@`` is the quoted schema of extension NAME (as in PostgreSQL
    16's extension scripts), and each ``@BOOT@`` body becomes plpython_body(). On Citus every function may
    also read the registry (reference tables, local on every node) from inside a query on a shard, which
    Citus refuses unless told (citus.allow_nested_distributed_execution) for the function's duration."""
    if citus:
        text = text.replace(f"SET search_path = {PINNED_PATH}",
                            f"SET search_path = {PINNED_PATH} SET citus.allow_nested_distributed_execution = on")
    def schema(m: re.Match) -> str:
        if m.group(1) not in schemas:
            raise DatabaseSetupError(f"sql/ refers to extension {m.group(1)}, which is not installed")
        return '"' + schemas[m.group(1)].replace('"', '""') + '"'

    text = re.sub(r"@extschema:([a-z0-9_]+)@", schema, text)
    return re.sub(r"@BOOT@\n(.*?)(?=^\$\$)", lambda m: plpython_body(python_path, m.group(1)), text,
                  flags=re.S | re.M)


def extension_schemas(cur: psycopg.Cursor) -> dict[str, str]:
    cur.execute("SELECT e.extname, n.nspname FROM pg_catalog.pg_extension e"
                " JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace")
    return dict(cur.fetchall())


def scheduling_notes(cur: psycopg.Cursor) -> list[str]:
    """What keeps pg_cron from running pgtraj's jobs on this server. With cron.use_background_workers off,
    pg_cron connects over libpq as each job's role, which fails unless the server lets it in without a
    password (trust/peer for cron.host in pg_hba.conf, or a .pgpass of the server's OS user)."""
    cur.execute("SELECT to_regnamespace('cron') IS NOT NULL, current_setting('cron.use_background_workers', true),"
                " current_setting('max_worker_processes')::int")
    enabled, workers, max_workers = cur.fetchone()
    if not enabled:
        return []
    if workers != "on":
        return ["pg_cron runs jobs over libpq connections here (cron.use_background_workers = off): pgtraj's "
                "scheduled jobs fail unless pg_hba.conf lets each job's role in from cron.host without a password. "
                "Set cron.use_background_workers = on (and max_worker_processes >= 16) in postgresql.conf and "
                "restart, as `pgtraj db start` does"]
    if max_workers < 16:
        return [f"max_worker_processes is {max_workers}: pg_cron's background workers share it with parallel "
                "query; raise it to 16 or more so scheduled jobs are not refused"]
    return []


_PROBE_BODY = """import json
@PATH@
out = {"executable": sys.executable, "python": sys.version.split()[0], "errors": {}}
for name in ("numpy", "onnxruntime", "h3", "pgtraj.runtime.api"):
    try:
        __import__(name)
    except Exception as exc:
        out["errors"][name] = "%s: %s" % (type(exc).__name__, exc)
if not out["errors"]:
    import os, pgtraj, pgtraj.runtime.api
    out.update(pgtraj.runtime.api.info())
    out["found_at"] = os.path.dirname(os.path.dirname(pgtraj.__file__))"""
_PROBE = ("CREATE FUNCTION pg_temp.pgtraj_probe() RETURNS text LANGUAGE plpython3u AS $$\n"
          f"{_PROBE_BODY}\nreturn json.dumps(out)\n$$")


def probe_runtime(cur: psycopg.Cursor, python_path: str | None) -> dict:
    """Ask PL/Python in the server what it can import; raise with a fix when it falls short."""
    cur.execute(_PROBE.replace("@PATH@", path_setup(python_path)))
    cur.execute("SELECT pg_temp.pgtraj_probe()")
    info = json.loads(cur.fetchone()[0])
    cur.execute("DROP FUNCTION pg_temp.pgtraj_probe()")
    check_runtime(info, python_path)
    return info


def check_runtime(info: dict, python_path: str | None, where: str = "the server") -> None:
    """What a probe found is what this client needs: every package, recent enough, and the same pgtraj."""
    path = f"python_path={python_path!r}" if python_path else "the server's default sys.path"
    fix = ("build the runtime environment on the database host with `pgtraj runtime-env /var/lib/pgtraj/runtime-venv` "
           "(it uses the system python3 that PL/Python embeds), then `pgtraj install --python-path <the "
           "site-packages it prints>`")
    if info["errors"]:
        missing = "; ".join(f"{k}: {v}" for k, v in info["errors"].items())
        raise RuntimeImportError(f"PL/Python on {where} (Python {info['python']}, {path}) cannot import: {missing}",
                                 hint=fix)
    for pkg, minimum in RUNTIME_MINIMUMS.items():
        if version_tuple(info[pkg]) < version_tuple(minimum):
            raise RuntimeImportError(f"PL/Python on {where} has {pkg} {info[pkg]}; pgtraj needs {minimum} or newer",
                                     hint=fix)
    if info["pgtraj"] != __version__ or info["digest"] != package_digest():
        raise RuntimeImportError(
            f"PL/Python on {where} imports pgtraj runtime {info['pgtraj']} (source digest {info['digest'][:12]}) but this "
            f"client is pgtraj {__version__} ({package_digest()[:12]})",
            hint="refresh the runtime environment (`pgtraj runtime-env PATH`; the local database does it on "
                 "`pgtraj db start`) so that both run the same code")
    if info["torch_loaded"]:
        raise DatabaseSetupError(f"the pgtraj runtime imported torch inside {where}", hint="this is a bug")


def _recorded_python_path(cur: psycopg.Cursor) -> str | None:
    cur.execute("SELECT to_regclass('pgtraj.installation') IS NOT NULL")
    if not cur.fetchone()[0]:
        return None
    cur.execute("SELECT python_path FROM pgtraj.installation")
    row = cur.fetchone()
    return row[0] if row else None


def apply_migrations(cur: psycopg.Cursor, migrations: list[Migration], log=print) -> list[str]:
    cur.execute("CREATE SCHEMA IF NOT EXISTS pgtraj")
    cur.execute("""CREATE TABLE IF NOT EXISTS pgtraj.schema_migrations (
                       version     text PRIMARY KEY,
                       name        text NOT NULL,
                       sha256      text NOT NULL,
                       pgtraj      text NOT NULL,
                       applied_at  timestamptz NOT NULL DEFAULT now())""")
    cur.execute("SELECT version, name, sha256 FROM pgtraj.schema_migrations ORDER BY version")
    recorded = {v: (name, sha) for v, name, sha in cur.fetchall()}
    known = {m.version: m for m in migrations}
    newer = sorted(set(recorded) - set(known))
    if newer:
        raise MigrationError(
            f"this database has migrations pgtraj {__version__} does not know: "
            + ", ".join(f"{v}_{recorded[v][0]}" for v in newer),
            hint="it was installed by a newer pgtraj; upgrade this client instead of downgrading the database")
    applied = []
    for m in migrations:
        if m.version in recorded:
            if recorded[m.version][1] != m.sha256:
                raise MigrationError(
                    f"migration {m.version}_{m.name} was edited after it was applied (sha256 differs)",
                    hint="never edit an applied migration; add a new one")
            continue
        log(f"applying migration {m.version}_{m.name}")
        cur.execute(m.sql)
        cur.execute("INSERT INTO pgtraj.schema_migrations (version, name, sha256, pgtraj) VALUES (%s, %s, %s, %s)",
                    [m.version, m.name, m.sha256, __version__])
        applied.append(f"{m.version}_{m.name}")
    return applied
