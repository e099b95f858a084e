"""The embedded local database: a PostgreSQL 15 cluster in a data directory of the user's choosing.

``pgtraj db start`` creates it on first use (initdb, password auth, TCP on 127.0.0.1 only, the preload
settings PostGIS/MobilityDB/pg_cron need), builds the PL/Python environment next to it, and starts it on
a free port. It is what every command uses when no ``--dsn`` is given, and what the test suite runs on.

Layout of ``home`` (default: ``$PGTRAJ_HOME``, else ``/var/lib/pgtraj`` for root, else
``$XDG_DATA_HOME/pgtraj``)::

    pgdata/          the cluster (owned by the server user; 'postgres' when run as root)
    runtime-venv/    PL/Python's environment: numpy, onnxruntime, h3, pgtraj.runtime
    cluster.json     port, database name, PL/Python environment path, Citus workers
    password         the superuser's generated password (mode 0600)
    workers/1, 2...  with ``--workers N``: Citus worker nodes, each a cluster of the same kind (same
                     password, settings and PL/Python environment) on its own free port; this cluster is
                     their coordinator (``citus`` preloaded first, nodes registered with citus_add_node)
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import socket
import subprocess
from pathlib import Path

from pgtraj.core.errors import DataDirectoryError, LocalDatabaseError, PortInUseError
from pgtraj.db.runtime_env import ensure_runtime_env

PG_BINDIR = Path(os.environ.get("PGTRAJ_PG_BINDIR", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "postgres"
DEFAULT_DBNAME = "pgtraj"


def default_home() -> Path:
    if os.environ.get("PGTRAJ_HOME"):
        return Path(os.environ["PGTRAJ_HOME"])
    if os.geteuid() == 0:  # root's home is not reachable by the 'postgres' user that runs the server
        return Path("/var/lib/pgtraj")
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "pgtraj"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are not "in use"
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class LocalCluster:
    """A local PostgreSQL cluster managed by pgtraj.

    ``settings`` are extra ``postgresql.conf`` lines (the test suite turns fsync off with them);
    ``runtime_venv`` may point at a shared, already-built PL/Python environment; ``training`` adds torch
    to it (training from SQL).
    """

    def __init__(self, home: str | Path | None = None, *, runtime_venv: str | Path | None = None,
                 dbname: str = DEFAULT_DBNAME, settings: dict[str, str] | None = None,
                 listen: str = "127.0.0.1", training: bool = False, citus: bool = False):
        self.home = Path(home or default_home()).absolute()
        self.pgdata = self.home / "pgdata"
        self.runtime_venv = Path(runtime_venv).absolute() if runtime_venv else self.home / "runtime-venv"
        self.dbname = dbname
        self.settings = dict(settings or {})
        self.listen = listen  # '*' in the Docker image, where clients come from outside the container
        self.training = training  # torch in the PL/Python environment too, for pgtraj.train in SQL
        self.citus = citus or bool(self._state_of(self.home).get("workers"))  # a coordinator stays one
        self._state_file = self.home / "cluster.json"
        self._password_file = self.home / "password"
        self.server_user = SUPERUSER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    # ------------------------------------------------------------------ queries
    def is_initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def is_running(self) -> bool:
        if not self.is_initialized():
            return False
        return self._pg_ctl(["status"], check=False).returncode == 0

    @property
    def port(self) -> int | None:
        return self._state().get("port")

    @property
    def python_path(self) -> str | None:
        """site-packages of the PL/Python environment; `pgtraj install` records it in the database."""
        return self._state().get("python_path")

    def url(self, dbname: str | None = None) -> str:
        port = self.port
        if port is None or not self._password_file.exists():
            raise LocalDatabaseError(f"no local database in {self.home}", hint="run `pgtraj db start`")
        password = self._password_file.read_text().strip()
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{port}/{dbname or self.dbname}"

    def status(self) -> dict:
        running = self.is_running()
        out = {"home": str(self.home), "initialized": self.is_initialized(), "running": running,
               "port": self.port, "database": self.dbname, "runtime_venv": str(self.runtime_venv),
               "url": self.url() if running else None}
        if self.workers():
            out["workers"] = [{"home": str(w.home), "running": w.is_running(), "port": w.port} for w in self.workers()]
        return out

    def workers(self) -> list["LocalCluster"]:
        """The Citus worker nodes of this coordinator (none for a single-node cluster)."""
        return [self._worker(i) for i in range(1, int(self._state().get("workers") or 0) + 1)]

    def _worker(self, i: int) -> "LocalCluster":
        return LocalCluster(self.home / "workers" / str(i), runtime_venv=self.runtime_venv, dbname=self.dbname,
                            settings=self.settings, listen=self.listen, training=self.training, citus=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self, port: int | None = None, *, workers: int | None = None, log=print) -> str:
        """Create (if needed) and start the cluster; return its URL. Idempotent, and always brings the
        PL/Python environment's copy of pgtraj up to date (new connections import the new code).
        ``workers``: make this a Citus coordinator with that many worker nodes on this host (started, and
        registered); None keeps what the cluster was (a coordinator restarts its workers)."""
        if workers:
            self._check_citus()
            if self.is_initialized() and not self.citus and self.is_running():
                raise LocalDatabaseError("the local database is running without Citus",
                                         hint="pgtraj db stop, then pgtraj db start --workers N")
            self.citus = True
            self._prepare_home()
            self._save_state(workers=max(workers, len(self.workers())))
        if self.is_running():
            if port is not None and port != self.port:
                raise LocalDatabaseError(f"the local database is already running on port {self.port}",
                                         hint="run `pgtraj db stop` first to move it to another port")
            ensure_runtime_env(self.runtime_venv, training=self.training, log=log)
            self._start_workers(log)
            return self.url()
        self._check_bindir()
        self._prepare_home()
        site = ensure_runtime_env(self.runtime_venv, training=self.training, log=log)
        if not self.is_initialized():
            self._initdb(log)
        port = self._choose_port(port, log)
        self._write_settings(port)
        log(f"starting PostgreSQL on 127.0.0.1:{port} (data: {self.pgdata})")
        proc = self._pg_ctl(["start", "-w", "-t", "120", "-l", str(self.pgdata / "server.log")], check=False)
        if proc.returncode != 0:
            raise LocalDatabaseError(
                f"PostgreSQL did not start:\n{proc.stderr.strip()}\n{self._log_tail()}",
                hint=f"the server log is {self.pgdata / 'server.log'}")
        self._save_state(port=port, python_path=str(site))
        self._allow_remote_clients()
        self._create_database()
        self._start_workers(log)
        return self.url()

    def _start_workers(self, log) -> None:
        """A coordinator's workers, started (with its password) and registered."""
        if not (self.citus and self.workers()):
            return
        for w in self.workers():
            w._adopt_password(self)
            w.start(log=lambda m, i=w.home.name: log(f"worker {i}: {m}"))
        self._register_workers(log)

    def _check_citus(self) -> None:
        share = subprocess.run([str(PG_BINDIR / "pg_config"), "--sharedir"], capture_output=True, text=True)
        if not (Path(share.stdout.strip()) / "extension" / "citus.control").exists():
            raise LocalDatabaseError("Citus is not installed on this host",
                                     hint="sudo docker/install-debian.sh (builds Citus 13.2.2; its source is read from"
                                          " PGTRAJ_SOURCES)")

    def _adopt_password(self, other: "LocalCluster") -> None:
        """This cluster logs in with ``other``'s superuser password: a Citus worker has its coordinator's
        (nodes log in to each other with it, pg_dist_authinfo), a standby its primary's (a copy of it)."""
        if not self._password_file.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(other._password_file.read_text())

    def _register_workers(self, log) -> None:
        """CREATE EXTENSION citus on every node, the password each node uses to reach the others, and the
        workers added to the coordinator (each once)."""
        import psycopg

        password = self._password_file.read_text().strip()
        for node in [self, *self.workers()]:
            with psycopg.connect(node.url(), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS citus")
                conn.execute("INSERT INTO pg_dist_authinfo (nodeid, rolename, authinfo) SELECT 0, %s, %s"
                              " WHERE NOT EXISTS (SELECT 1 FROM pg_dist_authinfo WHERE nodeid = 0 AND rolename = %s)",
                              [SUPERUSER, f"password={password}", SUPERUSER])
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute("SELECT citus_set_coordinator_host('127.0.0.1', %s)", [self.port])
            for w in self.workers():
                known = conn.execute("SELECT nodeport FROM pg_dist_node WHERE nodename = '127.0.0.1' AND noderole ="
                                     " 'primary' AND groupid > 0").fetchall()
                if (w.port,) not in known:
                    conn.execute("SELECT citus_add_node('127.0.0.1', %s)", [w.port])
                    log(f"Citus worker {w.home.name} on 127.0.0.1:{w.port} added")
            stale = [p for (p,) in conn.execute("SELECT nodeport FROM pg_dist_node WHERE groupid > 0")
                     if p not in [w.port for w in self.workers()]]
            for p in stale:  # a worker that came back on another port: its old entry goes
                conn.execute("SELECT citus_remove_node('127.0.0.1', %s)", [p])

    def start_replica(self, home: str | Path, *, port: int | None = None, log=print) -> "LocalCluster":
        """A hot standby of this running cluster in ``home``: a base backup taken over streaming replication
        (``pg_basebackup -R``: it follows this cluster from then on), started on its own port with the same
        settings and PL/Python environment. It serves every read-only pgtraj function (embed, predict_*,
        score, similar, ...) and sees what is registered and deployed here once it is replayed; anything that
        writes is refused there (SQLSTATE 25006). Idempotent: an existing replica in ``home`` is started."""
        if not self.is_running():
            raise LocalDatabaseError(f"the local database in {self.home} is not running", hint="pgtraj db start")
        replica = LocalCluster(home, runtime_venv=self.runtime_venv, dbname=self.dbname, settings=self.settings,
                               listen=self.listen, training=self.training)
        if not replica.is_initialized():
            replica._prepare_home()
            log(f"taking a base backup of 127.0.0.1:{self.port} into {replica.pgdata}")
            replica.pgdata.mkdir(mode=0o700, exist_ok=True)
            if os.geteuid() == 0:
                shutil_chown(replica.pgdata, self.server_user)
            # the connection string (password included) goes into the standby's postgresql.auto.conf (0600)
            self.as_server([str(PG_BINDIR / "pg_basebackup"), "-D", str(replica.pgdata), "-R", "-X", "stream",
                            "-c", "fast", "-d", self.url("postgres")])
            replica._adopt_password(self)
        replica.start(port=port, log=log)
        return replica

    def stop(self) -> bool:
        """Stop the cluster (and its Citus workers); return False when it was not running."""
        for w in self.workers():
            w.stop()
        if not self.is_running():
            return False
        self._pg_ctl(["stop", "-m", "fast", "-w", "-t", "60"])
        return True

    # ------------------------------------------------------------------ internals
    def _check_bindir(self) -> None:
        if not (PG_BINDIR / "initdb").exists():
            raise LocalDatabaseError(f"PostgreSQL 15 server binaries not found in {PG_BINDIR}",
                                     hint="install the stack: sudo docker/install-debian.sh")

    def _prepare_home(self) -> None:
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            probe = self.home / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise DataDirectoryError(f"data directory {self.home} is not writable: {exc.strerror}",
                                     hint="choose another one with --data-dir or $PGTRAJ_HOME") from exc
        if self.server_user != pwd.getpwuid(os.geteuid()).pw_name:
            # the server runs as 'postgres': every ancestor of pgdata must be searchable by it
            if self.as_server(["test", "-x", str(self.home)], check=False).returncode != 0:
                raise DataDirectoryError(
                    f"data directory {self.home} is not reachable by the server user '{self.server_user}' "
                    "(a parent directory is private, e.g. /root)",
                    hint="choose a directory such as /var/lib/pgtraj with --data-dir, or chmod o+x its parents")

    def _initdb(self, log) -> None:
        log(f"creating a new cluster in {self.pgdata}")
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            shutil_chown(self.pgdata, self.server_user)
        # a Citus worker has its coordinator's password already (_adopt_password)
        password = self._password_file.read_text().strip() if self._password_file.exists() else secrets.token_urlsafe(24)
        # initdb reads the password from a file: a private one (0600, owned by the server user), removed after
        pwfile = self.home / ".initdb-pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        if os.geteuid() == 0:
            shutil_chown(pwfile, self.server_user)
        try:
            proc = self.as_server(
                [str(PG_BINDIR / "initdb"), "-D", str(self.pgdata), "-U", SUPERUSER, "--auth=scram-sha-256",
                 f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8"], check=False)
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise LocalDatabaseError(f"initdb failed:\n{proc.stderr.strip()}", hint=f"is {self.pgdata} empty?")
        fd = os.open(self._password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        with open(self.pgdata / "postgresql.conf", "a") as f:
            f.write("\n# pgtraj writes its settings here on every `pgtraj db start`\ninclude_if_exists = 'pgtraj.conf'\n")

    def _choose_port(self, port: int | None, log) -> int:
        if port is not None:
            if not port_is_free(port):
                raise PortInUseError(f"port {port} on 127.0.0.1 is already in use by another program",
                                     hint="pick another with --port, or leave it out to use a free one")
            return port
        stored = self.port
        if stored is not None and port_is_free(stored):
            return stored
        new = free_port()
        if stored is not None:
            log(f"port {stored} is taken now; using {new} instead")
        return new

    def _write_settings(self, port: int) -> None:
        settings = {
            "listen_addresses": f"'{self.listen}'",
            "port": str(port),
            "unix_socket_directories": "''",  # TCP only: no socket paths to share or outgrow
            # Citus must come first where it is loaded
            "shared_preload_libraries": "'citus,postgis-3,pg_cron'" if self.citus else "'postgis-3,pg_cron'",
            **({"citus.node_conninfo": "'sslmode=prefer'"} if self.citus else {}),
            "cron.database_name": f"'{self.dbname}'",
            # pg_cron runs each job in a background worker as the job's role: over libpq it would need a
            # password-less login, which this cluster (scram only, TCP only) rightly refuses
            "cron.use_background_workers": "on",
            "max_worker_processes": "24",  # pg_cron's workers share them with parallel query
            "max_locks_per_transaction": "128",  # MobilityDB's recommendation
            **self.settings,
        }
        text = "".join(f"{k} = {v}\n" for k, v in settings.items())
        conf = self.pgdata / "pgtraj.conf"
        self.as_server(["tee", str(conf)], input=text)

    def _allow_remote_clients(self) -> None:
        """When listening beyond loopback, accept password (scram) logins from any address.
        pg_hba.conf is read at connection time; a reload makes the new line effective."""
        if self.listen in ("127.0.0.1", "localhost"):
            return
        hba = self.pgdata / "pg_hba.conf"
        line = "host all all all scram-sha-256  # pgtraj: --listen"
        if line not in self.as_server(["cat", str(hba)]).stdout:
            self.as_server(["tee", "-a", str(hba)], input=line + "\n")
            self._pg_ctl(["reload"])

    def _create_database(self) -> None:
        import psycopg  # deferred: the module is also imported by code that never connects

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [self.dbname]).fetchone():
                from psycopg import sql

                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.dbname)))

    def _state(self) -> dict:
        return self._state_of(self.home)

    @staticmethod
    def _state_of(home: Path) -> dict:
        try:
            return json.loads((home / "cluster.json").read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self, **values) -> None:
        self._state_file.write_text(json.dumps({**self._state(), "dbname": self.dbname, **values}, indent=2))

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.pgdata / "server.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _pg_ctl(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return self.as_server([str(PG_BINDIR / "pg_ctl"), "-D", str(self.pgdata), *args], check=check)

    def as_server(self, cmd: list[str], *, input: str | None = None, check: bool = True):
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            cmd = ["runuser", "-u", self.server_user, "--", *cmd]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise LocalDatabaseError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()}")
        return proc


def shutil_chown(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
