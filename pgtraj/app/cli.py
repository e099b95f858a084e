"""The `pgtraj` command line."""

from __future__ import annotations

import argparse
import json
import sys

from pgtraj import __version__
from pgtraj.core.clean import PROFILES
from pgtraj.core.contract import SOURCE_OPTIONS
from pgtraj.core.errors import PgtrajError, SourceError


def _db(args) -> int:
    from pgtraj.db.cluster import LocalCluster

    cluster = LocalCluster(args.data_dir, listen=args.listen, training=args.training)
    if args.action == "start":
        url = cluster.start(port=args.port, workers=args.workers, log=_say)
        _say(f"local database running: {url}")
        for w in cluster.workers():
            _say(f"Citus worker {w.home.name}: {w.url()}")
    elif args.action == "stop":
        _say("stopped" if cluster.stop() else "not running")
    elif args.action == "status":
        status = cluster.status()
        print(json.dumps(status, indent=2))
        return 0 if status["running"] else 3  # pg_ctl's convention: 3 = not running
    elif args.action == "replica":
        from pathlib import Path

        home = Path(args.replica_dir) if args.replica_dir else cluster.home / "replica"
        replica = cluster.start_replica(home, port=args.port, log=_say)
        _say(f"hot standby of {cluster.home} running: {replica.url()} (stop it with: pgtraj db stop --data-dir {home})")
    elif args.action == "url":
        if not cluster.is_running():
            _say(f"the local database in {cluster.home} is not running; run `pgtraj db start`")
            return 3
        print(cluster.url())
    return 0


def _install(args) -> int:
    from pgtraj.db.connection import resolve_dsn
    from pgtraj.db.install import install

    python_path = args.python_path
    if python_path is None and not args.dsn and not _env_dsn():
        from pgtraj.db.cluster import (
            LocalCluster,  # the local database knows its own runtime environment
        )

        python_path = LocalCluster(args.data_dir).python_path
    install(resolve_dsn(args.dsn, args.data_dir), python_path=python_path, log=_say)
    return 0


def _load(args) -> int:
    from psycopg.types.json import Jsonb

    from pgtraj.db.connection import connect, resolve_dsn
    from pgtraj.db.datasets import default_data_dir, load_geolife, parse_ids

    with connect(resolve_dsn(args.dsn, args.data_dir)) as conn:
        if args.dataset == "file":
            from pgtraj.db.files import load_file

            if not args.path or not args.table:
                raise SourceError("pgtraj load file needs --path FILE and --table NAME")
            r = load_file(conn, args.path, args.table, fmt=args.format, id_column=args.id_column,
                          time_column=args.time_column, lat_column=args.lat_column, lon_column=args.lon_column,
                          time_format=args.time_format, replace=args.replace, log=_say)
            _say(f"loaded {r.rows:,} rows into {r.table} ({', '.join(f'{c} {t}' for c, t in r.columns.items())})"
                 f" in {r.seconds:.1f} s; train on it with: pgtraj train NAME --table {r.table} --id-column"
                 f" {args.id_column or '<who moves>'}")
            if args.trips:
                if not args.id_column:
                    raise SourceError("--trips needs --id-column: whose fix each row is")
                conn.commit()
                conn.autocommit = True
                conn.add_notice_handler(lambda d: _say(d.message_primary))
                conn.execute("CALL pgtraj.make_trips(%s, %s, %s, %s)",
                             [r.table, args.trips, Jsonb({"id_column": args.id_column}), args.replace])
            return 0
        path = args.path or default_data_dir() / "geolife"
        r = load_geolife(conn, path, schema=args.schema, users=parse_ids(args.users), replace=args.replace, log=_say)
    _say(f"loaded {r.points} fixes of {r.users} users: {r.schema}.points, {r.trajectories} LINESTRING M in "
         f"{r.schema}.trajectories, {r.trips} tgeompoint in {r.schema}.trips, {r.labels} mode labels "
         f"({sum(r.seconds.values()):.1f} s)")
    return 0


def _train(args) -> int:
    import json as _json
    from pathlib import Path

    from pgtraj.app.training import train_and_register
    from pgtraj.db.connection import resolve_dsn
    from pgtraj.learn.train import TrainConfig

    cfg = _json.loads(Path(args.config).read_text()) if args.config else {}
    for key in ("objective", "steps", "device", "init_from", "split_by"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg.get("init_from") == "none":
        cfg["init_from"] = None
    for key, value in (("resolution", args.resolution), ("timezone", args.timezone)):
        if value is not None:
            cfg["tokenizer"] = {**cfg.get("tokenizer", {}), key: int(value) if value.isdigit() else value}
    cfg["cleaning"] = {**cfg.get("cleaning", {}), **_cleaning(args)}
    out = Path(args.out or f"pgtraj-output/runs/{args.name}").absolute()
    mv = train_and_register(resolve_dsn(args.dsn, args.data_dir), args.name, args.table, TrainConfig.from_dict(cfg),
                            out, **{k: getattr(args, k) for k in SOURCE_OPTIONS if getattr(args, k)},
                            deploy=args.deploy, log=_say)
    if mv is not None:  # rank 0 under torchrun, or a single process
        _say(f"training curve: {out / 'training_curve.png'}; tokenizer: {out / 'tokenizer.json'}")
    return 0


def _trips(args) -> int:
    from psycopg.types.json import Jsonb

    from pgtraj.db.connection import connect, resolve_dsn

    import psycopg

    from pgtraj.db.readers import source_error

    options = {k: getattr(args, k) for k in SOURCE_OPTIONS if getattr(args, k, None)}
    options["cleaning"] = _cleaning(args)
    with connect(resolve_dsn(args.dsn, args.data_dir), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: _say(d.message_primary))
        try:
            conn.execute("CALL pgtraj.make_trips(%s, %s, %s, %s)", [args.source, args.target, Jsonb(options),
                                                                     args.replace])
        except psycopg.Error as exc:
            raise source_error(exc) from None
    return 0


def _cleaning(args) -> dict:
    """The cleaning options the command line named (CleaningOptions keys)."""
    named = {"profile": args.profile, "max_speed_mps": args.max_speed, "max_gap_s": args.max_gap,
             "max_discard": 1.0 if args.allow_discard else None}
    return {k: v for k, v in named.items() if v is not None}


def _cleaning_flags(sp) -> None:
    sp.add_argument("--profile", choices=["auto", *PROFILES],
                    help="cleaning thresholds of a domain (default auto: from the data's own speeds and intervals)")
    sp.add_argument("--max-speed", type=float, help="cleaning: fixes reached faster than this (m/s) are GPS errors")
    sp.add_argument("--max-gap", type=float, help="cleaning: a pause longer than this (s) ends a trip")
    sp.add_argument("--allow-discard", action="store_true",
                    help="go on even if cleaning discards more than cleaning.max_discard (20%%) of the fixes")


def _runtime_env(args) -> int:
    from pgtraj.db.runtime_env import ensure_runtime_env

    site = ensure_runtime_env(args.path, training=args.training, log=_say)
    _say("runtime environment ready; install with:")
    print(f"pgtraj install --dsn ... --python-path {site}")
    return 0


def _models(args) -> int:
    from pgtraj.db.connection import connect, resolve_dsn
    from pgtraj.db.registry import list_models

    with connect(resolve_dsn(args.dsn, args.data_dir)) as conn:
        if args.action == "add":
            from pgtraj.app.base_model import add
            from pgtraj.core.contract import BASE_MODEL

            add(conn, name=args.name or BASE_MODEL, deploy=not args.no_deploy, log=_say)
            return 0
        rows = list_models(conn)
    if not rows:
        _say("no models registered")
    for r in rows:
        metric = f"{r['primary_metric']}={r['primary_metric_value']:.4g}" if r["primary_metric"] else ""
        print(f"{r['name']:<24} v{r['version']:<4} {r['objective']:<14} {'*deployed*' if r['deployed'] else '':<10} "
              f"dim {r['embedding_dim']:<4} res {r['resolution']} {r['vocabulary_cells']:>7,} cells {r['timezone']:<8} "
              f"{metric} {','.join(r['artifacts'] or [])}")
    return 0


def _base(args) -> int:
    """Rebuild the shipped base model from GeoLife (what pgtraj/assets/base holds)."""
    from pathlib import Path

    from pgtraj.app.base_model import ASSET_DIR, build
    from pgtraj.db.datasets import default_data_dir

    card = build(Path(args.path) if args.path else default_data_dir() / "geolife",
                 json.loads(Path(args.config).read_text()), Path(args.out),
                 release_dir=Path(args.release_dir) if args.release_dir else ASSET_DIR, log=_say)
    _say(f"{card['name']}: {card['parameters']:,} parameters, {card['steps']} steps, {card['tokens_seen']:,} tokens"
         f" in {card['wall_seconds']} s on {card['device']}; val_loss {card['metrics']['val_loss']:.4f}")
    return 0


def _deploy(args) -> int:
    from pgtraj.db.connection import connect, resolve_dsn
    from pgtraj.db.registry import deploy

    with connect(resolve_dsn(args.dsn, args.data_dir)) as conn:
        row = deploy(conn, args.name, args.version, args.note)
    _say(f"deployed {row['name']} v{row['version']} ({row['strategy']})")
    return 0


def _quickstart(args) -> int:
    """The README's main job (see pgtraj/quickstart.py)."""
    from pathlib import Path

    from pgtraj.app.quickstart import run
    from pgtraj.db.cluster import LocalCluster
    from pgtraj.db.datasets import default_data_dir, parse_ids

    cluster = LocalCluster(args.data_dir)
    run(cluster, data_dir=Path(args.path) if args.path else default_data_dir() / "geolife",
        users=parse_ids(args.users), out_dir=Path(args.out), steps=args.steps, log=_say)
    return 0


def _env_dsn() -> bool:
    import os

    from pgtraj.db.connection import DSN_ENV

    return bool(os.environ.get(DSN_ENV))


def _say(msg: str) -> None:
    print(f"pgtraj: {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgtraj", description="Trajectory foundation models inside PostgreSQL.")
    p.add_argument("--version", action="version", version=f"pgtraj {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def target(sp):  # where to connect: --dsn, $PGTRAJ_DSN, or the local database
        sp.add_argument("--dsn", help="connection string of an existing database (default: $PGTRAJ_DSN, "
                                      "else the local database from `pgtraj db start`)")
        sp.add_argument("--data-dir", help="home of the local database (default: $PGTRAJ_HOME or the user data dir)")

    sp = sub.add_parser("db", help="manage the local database (start|stop|status|url|replica)")
    sp.add_argument("action", choices=["start", "stop", "status", "url", "replica"],
                    help="replica: start a hot standby of the running local database (pg_basebackup -R)")
    sp.add_argument("--replica-dir", help="replica: where the standby lives (default: DATA_DIR/replica)")
    sp.add_argument("--workers", type=int, help="start: a Citus coordinator with N worker nodes on this host")
    sp.add_argument("--data-dir", help="where the cluster and its PL/Python environment live")
    sp.add_argument("--port", type=int, help="TCP port (default: the last one used, else a free one)")
    sp.add_argument("--training", action="store_true", help="add torch to the PL/Python environment (pgtraj.train)")
    sp.add_argument("--listen", default="127.0.0.1",
                    help="listen_addresses (default 127.0.0.1; '*' accepts password logins from anywhere)")
    sp.set_defaults(func=_db)

    sp = sub.add_parser("install", help="install or upgrade pgtraj in a database (validates it first)")
    target(sp)
    sp.add_argument("--python-path", help="site-packages of the PL/Python runtime environment on the server")
    sp.set_defaults(func=_install)

    sp = sub.add_parser("load", help="load GeoLife, or a CSV/Parquet/GPX file of fixes, into PostGIS tables")
    sp.add_argument("dataset", choices=["geolife", "file"],
                    help="geolife: the GeoLife 1.3 dataset; file: one CSV, Parquet or GPX file as a point table")
    target(sp)
    sp.add_argument("--path", help="geolife: folder with points.parquet and labels.parquet (default: $PGTRAJ_DATA/"
                                   "geolife, else ../shared/data/geolife beside the checkout), or Microsoft's"
                                   " 'Geolife Trajectories 1.3.zip' as distributed; file: the file")
    sp.add_argument("--users", help="geolife: user ids to load, e.g. 0-9,17 (default: all)")
    sp.add_argument("--schema", default="geolife", help="geolife: the schema it is loaded into")
    sp.add_argument("--table", help="file: the table to create (schema.table)")
    sp.add_argument("--format", choices=["csv", "parquet", "gpx"], help="file: its format (default: from its name)")
    sp.add_argument("--id-column", help="file: who moves (indexed with the time)")
    sp.add_argument("--time-column", help="file: the fix's time")
    sp.add_argument("--time-format", help="file: strptime format of a CSV time column that is not ISO 8601 (UTC unless it has %%z)")
    sp.add_argument("--lat-column", help="file: latitude in degrees (default: lat or latitude); with a longitude,"
                                         " a geom column is added")
    sp.add_argument("--lon-column", help="file: longitude in degrees (default: lon, lng or longitude)")
    sp.add_argument("--trips", help="file: also build this table of trips from the fixes (pgtraj.make_trips)")
    sp.add_argument("--replace", action="store_true", help="drop and reload an existing schema or table")
    sp.set_defaults(func=_load)

    sp = sub.add_parser("train", help="train a model on a table or query of trajectories (any shape), register it",
                        description="Trains on LINESTRING M, tgeompoint or one-row-per-fix tables (or a query);"
                                    " columns are found by type and usual names unless named; without a split"
                                    " column the run makes its splits (--split-by) and records them.")
    target(sp)
    sp.add_argument("name", help="model name in the registry")
    sp.add_argument("--table", default="geolife.trajectories", help="a table (schema.table) or a query (SELECT ...)")
    sp.add_argument("--id-column", help="the trajectory's id (default: the primary key); for one row per fix: whose"
                                        " fix it is (a vehicle, person or animal), required")
    sp.add_argument("--traj-column", help="its LINESTRING M, tgeompoint or point geometry (default: the only one)")
    sp.add_argument("--time-column", help="one row per fix: the fix's time (timestamptz, timestamp as UTC, or epoch"
                                          " seconds; default: the only timestamp column)")
    sp.add_argument("--lat-column", help="one row per fix without a geometry: latitude in degrees (default: lat)")
    sp.add_argument("--lon-column", help="... longitude in degrees (default: lon, lng or longitude)")
    sp.add_argument("--entity-column", help="who moves, when several trajectory ids belong to one (splits by it)")
    sp.add_argument("--split-column", help="column with train/val/test (default: 'split' where there is one)")
    sp.add_argument("--split-by", choices=["time", "entity"],
                    help="without a split column: each entity's latest 30%% of fixes held out (time, default), or"
                         " whole entities (entity)")
    _cleaning_flags(sp)
    sp.add_argument("--resolution", help="H3 resolution 5-12 (default: the pretrained model's, else from the data)")
    sp.add_argument("--timezone", help="local time for time features: auto (each fix's zone, default) or an IANA name")
    sp.add_argument("--config", help="training config JSON (see training/); its keys are TrainConfig fields")
    sp.add_argument("--objective", help="next_cell, masked_spans, contrastive, hybrid (pretraining); destination,"
                    " travel_time, classify (fine-tuning, usually with --init-from)")
    sp.add_argument("--init-from", help="a registered model (e.g. pgtraj-base, name@3) or a checkpoint.pt to"
                                        " fine-tune from; default auto: pgtraj-base where it is registered and"
                                        " suits the run; none: from scratch")
    sp.add_argument("--label-column", help="per-trajectory label for --objective classify (e.g. a mode or user id)")
    sp.add_argument("--steps", type=int)
    sp.add_argument("--device", choices=["auto", "cpu", "cuda"])
    sp.add_argument("--out", help="checkpoint, metrics, curve and tokenizer.json (default pgtraj-output/runs/NAME under"
                                  " the current directory); re-run to resume")
    sp.add_argument("--deploy", action="store_true", help="deploy the new version when done")
    sp.set_defaults(func=_train)

    sp = sub.add_parser("trips", help="turn a table or query of fixes (or lines, tgeompoints) into a table of trips,"
                                      " one LINESTRING M each, cleaned (pgtraj.make_trips)")
    target(sp)
    sp.add_argument("source", help="a table (schema.table) or a query (SELECT ...)")
    sp.add_argument("target", help="the table to create (schema.table)")
    for flag in ("id", "traj", "time", "lat", "lon", "entity", "label"):
        sp.add_argument(f"--{flag}-column", help=f"the source's {flag} column (see pgtraj train)")
    _cleaning_flags(sp)
    sp.add_argument("--replace", action="store_true", help="drop and rebuild an existing target")
    sp.set_defaults(func=_trips)

    sp = sub.add_parser("runtime-env", help="build the PL/Python environment for a server on this host")
    sp.add_argument("path", help="where to create the venv, e.g. /var/lib/pgtraj/runtime-venv")
    sp.add_argument("--training", action="store_true", help="add torch, for training inside the database")
    sp.set_defaults(func=_runtime_env)

    sp = sub.add_parser("models", help="list registered models, or add the shipped base model (models add base)")
    sp.add_argument("action", nargs="?", choices=["list", "add"], default="list")
    sp.add_argument("what", nargs="?", choices=["base"], default="base", help="what to add: the shipped base model")
    target(sp)
    sp.add_argument("--name", help="register it under this name (default pgtraj-base)")
    sp.add_argument("--no-deploy", action="store_true", help="register without deploying")
    sp.set_defaults(func=_models)

    sp = sub.add_parser("base", help="rebuild the shipped base model from GeoLife (training/base.json)")
    sp.add_argument("action", choices=["build"])
    sp.add_argument("--config", default="training/base.json", help="the recipe (TrainConfig keys)")
    sp.add_argument("--path", help="GeoLife folder (default: $PGTRAJ_DATA/geolife, else ../shared/data/geolife)")
    sp.add_argument("--out", default="pgtraj-output/runs/base", help="checkpoint, metrics and training curve")
    sp.add_argument("--release-dir", help="where the release goes (default: the package's assets/base)")
    sp.set_defaults(func=_base)

    sp = sub.add_parser("deploy", help="deploy a model version (number, latest, best, rollback)")
    target(sp)
    sp.add_argument("name")
    sp.add_argument("version", nargs="?", default="latest")
    sp.add_argument("--note")
    sp.set_defaults(func=_deploy)

    sp = sub.add_parser("quickstart", help="the main job: local database, install, the base model, load GeoLife,"
                                           " fine-tune, embed, search and predict in SQL")
    sp.add_argument("--data-dir", help="home of the local database")
    sp.add_argument("--path", help="GeoLife folder (default: $PGTRAJ_DATA/geolife, else ../shared/data/geolife)")
    sp.add_argument("--users", default="0-9", help="GeoLife users to load (default 0-9; 'all' for every user)")
    sp.add_argument("--out", default="pgtraj-output", help="folder for the tokenizer, runs, summary and map")
    sp.add_argument("--steps", type=int, default=200, help="next-move fine-tuning steps from pgtraj-base")
    sp.set_defaults(func=_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PgtrajError as exc:
        print(f"pgtraj: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"pgtraj: hint: {exc.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pgtraj: interrupted", file=sys.stderr)
        return 130


