"""Training inside PostgreSQL: ``CALL pgtraj.train(...)``, by hand or from pg_cron.

The one place the server imports torch (the rest of pgtraj.runtime never does), from the PL/Python
environment built with ``--training``. Data is read through SPI from a table or a query, cleaned and split
exactly as the client does; the training loop, ONNX export and parity check are the client's own code.
Each stage commits: the run's row is visible as 'running' while it trains, and a failed or cancelled run
is recorded as such with the deployed model untouched. A second run of the same model name while one
is going is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

from .batch import begin_procedure, resolve_table
from .server import InferenceError, check_interrupts, sqlstate_of

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$")
_SOURCE_KEYS = ("id_column", "traj_column", "split_column")
DEPLOY_POLICIES = ("auto", "always", "never")


def _split_source(plpy, source: str, opts: dict) -> str:
    """SQL giving (id text, wkb bytea, split text) for a table name or a query."""
    if re.match(r"^\s*(select|with)\b", source, re.IGNORECASE):
        return (f"SELECT q.id::pg_catalog.text AS id, r.w, r.reason, q.split::pg_catalog.text AS split"
                f" FROM ({source}) AS q(id, traj, split), pgtraj._wkb_or_reason(q.traj) r")
    oid, table = resolve_table(plpy, source)
    cols = {r["attname"]: r["t"] for r in plpy.execute(plpy.prepare(
        "SELECT a.attname, t.typname AS t FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t"
        " ON t.oid = a.atttypid WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped", ["oid"]), [oid])}
    traj = opts.get("traj_column") or next((c for c, t in cols.items() if t in ("geometry", "tgeompoint")), None)
    key = opts.get("id_column") or next((r["attname"] for r in plpy.execute(plpy.prepare(
        "SELECT a.attname FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid"
        " AND a.attnum = i.indkey[0] WHERE i.indrelid = $1 AND i.indisprimary", ["oid"]), [oid])), None)
    split = opts.get("split_column", "split")
    for what, col in (("trajectory", traj), ("id", key), ("split", split)):
        if col is None or col not in cols:
            raise InferenceError(f"{table} has no {what} column {col!r}" if col else f"{table}: no {what} column found",
                                 sqlstate="42703",
                                 hint='name it in config: {"id_column": ..., "traj_column": ..., "split_column": ...}')
    q = plpy.quote_ident
    return (f"SELECT t.{q(key)}::pg_catalog.text AS id, r.w, r.reason, t.{q(split)}::pg_catalog.text AS split"
            f" FROM {table} t, pgtraj._wkb_or_reason(t.{q(traj)}) r ORDER BY t.{q(key)}")


def read_splits(plpy, source: str, opts: dict) -> tuple[dict, dict]:
    """{'train': [...], 'val': [...]} of cleaned pieces, and what reading and cleaning dropped."""
    from ..clean import CleaningConfig, CleaningReport, clean
    from ..errors import TrajectoryError
    from ..trajectory import from_wkb

    splits = {"train": [], "val": []}
    report, rejected = CleaningReport(), {}
    cursor = plpy.cursor(_split_source(plpy, source, opts))
    try:  # closed before anything commits or rolls back: an open cursor would pin its portal
        while True:
            rows = cursor.fetch(500)
            if not rows:
                break
            for r in rows:
                if r["split"] not in splits:
                    continue
                if r["w"] is None:
                    if r["reason"]:  # PostGIS or MobilityDB refused the row's trajectory
                        rejected[r["reason"]] = rejected.get(r["reason"], 0) + 1
                    continue
                try:
                    tr = from_wkb(r["id"], r["w"])
                except TrajectoryError as exc:
                    rejected[exc.reason] = rejected.get(exc.reason, 0) + 1
                    continue
                splits[r["split"]] += clean(tr, CleaningConfig(), report)
    finally:
        cursor.close()
    return splits, {"rejected": rejected, "cleaning": dict(report.counts)}


def train(plpy, name: str, source: str, objective: str, config: str, deploy: str) -> dict:
    begin_procedure(plpy, "pgtraj.train")
    if not _NAME.match(name or ""):
        raise InferenceError(f"invalid model name {name!r}", sqlstate="22023",
                             hint="a letter, then letters, digits, '_', '.' or '-' (at most 63)")
    if deploy not in DEPLOY_POLICIES:
        raise InferenceError(f"deploy must be one of {DEPLOY_POLICIES}, not {deploy!r}", sqlstate="22023")
    try:
        import torch  # noqa: F401  (only here: inference never loads it)
    except ImportError:
        raise InferenceError("torch is not installed in the PL/Python environment, so this server cannot train",
                             sqlstate="0A000",
                             hint="pgtraj runtime-env PATH --training (or pgtraj db start --training), then"
                                  " pgtraj install; or train from a client: pgtraj train") from None
    from ..errors import PgtrajError
    from ..train import TrainConfig

    opts = json.loads(config)
    if not isinstance(opts, dict):
        raise InferenceError("config must be a JSON object", sqlstate="22023")
    source_opts = {k: opts.pop(k) for k in _SOURCE_KEYS if k in opts}
    try:
        cfg = TrainConfig.from_dict({**opts, "objective": objective})
    except PgtrajError as exc:
        raise InferenceError(exc.message, sqlstate="22023", hint=exc.hint) from None
    locked = plpy.execute(plpy.prepare("SELECT pg_catalog.pg_try_advisory_lock(pg_catalog.hashtext('pgtraj.train'),"
                                       " pg_catalog.hashtext($1)) AS ok", ["text"]), [name])[0]["ok"]
    if not locked:
        raise InferenceError(f"model {name!r} is being trained by another session", sqlstate="55P03",
                             hint="SELECT * FROM pgtraj.training_status WHERE status = 'running'")
    try:
        return _run(plpy, name, source, source_opts, cfg, deploy)
    finally:
        plpy.execute(plpy.prepare("SELECT pg_catalog.pg_advisory_unlock(pg_catalog.hashtext('pgtraj.train'),"
                                  " pg_catalog.hashtext($1))", ["text"]), [name])


def _run(plpy, name, source, source_opts, cfg, deploy) -> dict:
    from dataclasses import asdict

    from .models import cache_dir

    run_id = plpy.execute(plpy.prepare("SELECT pgtraj._run_start($1, $2, $3, $4, $5) AS id",
                                       ["text", "text", "text", "jsonb", "text"]),
                          [name, source, cfg.objective, json.dumps({**asdict(cfg), **source_opts}), deploy])[0]["id"]
    plpy.commit()  # visible as 'running' from now on
    finish = plpy.prepare("SELECT pgtraj._run_finish($1, $2, $3, $4, $5, $6)",
                          ["int8", "text", "text", "jsonb", "text", "text"])
    db = plpy.execute("SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()")[0]["oid"]
    out_dir = os.path.join(cache_dir(), "runs", str(db), f"run-{run_id}")  # no name from the caller in a path
    try:
        out = _train_register_deploy(plpy, run_id, name, source, source_opts, cfg, deploy, out_dir)
        plpy.execute(finish, [run_id, "succeeded", None, json.dumps(out["metrics"]), out["outcome"], out["device"]])
        plpy.commit()
        plpy.notice(f"pgtraj.train {name}: {out['outcome']}")
        return out
    except BaseException as exc:
        # a cancel may surface from a query (SPIError) or from a NOTICE being sent (plpy.Error): either
        # way it carries SQLSTATE 57014
        cancelled = sqlstate_of(exc) == "57014"
        plpy.rollback()  # nothing registered, the deployed model untouched
        message = getattr(exc, "message", None) or (exc.args[0] if exc.args else str(exc))
        plpy.execute(finish, [run_id, "cancelled" if cancelled else "failed", str(message)[:4000], None,
                              "nothing registered", None])
        plpy.commit()
        raise
    finally:  # metrics live in the run's row and the registry; checkpoints would only fill the data directory
        shutil.rmtree(out_dir, ignore_errors=True)


def _train_register_deploy(plpy, run_id, name, source, source_opts, cfg, deploy, out_dir) -> dict:
    from dataclasses import asdict

    from ..errors import PgtrajError
    from ..export import example_batch, export_checked
    from ..train import train

    splits, dropped = read_splits(plpy, source, source_opts)
    plpy.notice(f"pgtraj.train {name}: {len(splits['train'])} train / {len(splits['val'])} val pieces"
                f" from {source}")
    last = [time.perf_counter()]

    def on_step(step, model, metrics):
        check_interrupts(plpy)  # a cancel (pg_cancel_backend, statement_timeout) stops training here
        if time.perf_counter() - last[0] > 10 or step == cfg.steps:
            last[0] = time.perf_counter()
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            plpy.notice(f"pgtraj.train {name}: step {step}/{cfg.steps}, {shown}")

    try:
        result = train(splits["train"], splits["val"], cfg, out_dir, progress=False,
                       log=lambda m: plpy.notice(f"pgtraj.train {name}: {m}"), on_step=on_step)
    except PgtrajError as exc:
        raise InferenceError(exc.message, sqlstate="22023", hint=exc.hint) from None
    example = example_batch(result.tokenizer, splits["val"], cfg.max_len)
    artifacts, parity = export_checked(result.model, cfg.objective, example)
    metrics = {**result.metrics, "onnx_max_abs_diff": parity, "data": dropped}
    row = plpy.execute(plpy.prepare(
        "SELECT model_id, version FROM pgtraj._register($1, $2, $3, $4, $5, 'val_loss', false, $6, $7, $8, $9, $10)",
        ["text", "text", "jsonb", "jsonb", "jsonb", "int4", "int8", "text", "text[]", "bytea[]"]),
        [name, cfg.objective, json.dumps({"train": asdict(result.config),
                                          "model": result.model_config.to_dict(), "classes": result.classes}),
         result.tokenizer.to_json(), json.dumps(metrics), result.model_config.d_model, run_id,
         f"trained in the database from {source}", list(artifacts), list(artifacts.values())])[0]
    outcome = f"registered v{row['version']}"
    current = plpy.execute(plpy.prepare(
        "SELECT m.version, (m.metrics OPERATOR(pg_catalog.->>) 'val_loss')::pg_catalog.float8 AS val_loss, m.objective"
        " FROM pgtraj.deployments d JOIN pgtraj.model_registry m ON m.id = d.model_id WHERE d.name = $1", ["text"]),
        [name])
    new_loss = metrics["val_loss"]
    live = current[0] if current.nrows() else None
    if deploy == "always" or live is None:
        why = ""
    elif live["objective"] != cfg.objective:
        why = f" (the deployed v{live['version']} was trained for {live['objective']})"
    elif live["val_loss"] is None:
        why = f" (the deployed v{live['version']} has no val_loss to compare with)"
    elif new_loss < live["val_loss"]:
        why = f" (val_loss {new_loss:.4f} < {live['val_loss']:.4f} of v{live['version']})"
    else:
        why = None  # not better: keep the deployed version
    if deploy == "always" or (deploy == "auto" and why is not None):
        plpy.execute(plpy.prepare("SELECT 1 FROM pgtraj.deploy($1, $2, $3)", ["text", "text", "text"]),
                     [name, str(row["version"]), f"training run {run_id} ({deploy})"])
        outcome += f", deployed{why}"
    elif deploy == "auto":
        outcome += (f", not deployed: val_loss {new_loss:.4f} is not better than {current[0]['val_loss']:.4f}"
                    f" of the deployed v{current[0]['version']}")
    return {"run_id": run_id, "model_id": row["model_id"], "version": row["version"], "metrics": metrics,
            "outcome": outcome, "device": result.device}
