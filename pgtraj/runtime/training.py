"""Training inside PostgreSQL: ``CALL pgtraj.train(...)``, by hand or from pg_cron.

The one place the server imports torch (the rest of pgtraj.runtime never does), from the PL/Python
environment built with ``--training``, and only through the documented entry into the torch side,
learn.pipeline: the same fit and export the client runs (app/training.py). Data is read through SPI from a
table or a query, with the caller's rights, and cleaned exactly as the client does.
Each stage commits: the run's row is visible as 'running' while it trains, and a failed or cancelled run
is recorded as such with the deployed model untouched. A second run of the same model name while one
is going is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from pgtraj.core.contract import MODEL_NAME, SOURCE_OPTIONS
from pgtraj.runtime import sources
from pgtraj.runtime.batch import begin_procedure
from pgtraj.runtime.server import (
    InferenceError,
    advisory_lock,
    check_interrupts,
    sqlstate_of,
)

DEPLOY_POLICIES = ("auto", "always", "never")


def read_source(plpy, source: str, opts: dict, cfg, log):
    """The source's rows (runtime/sources.py), cleaned and split as ``cfg`` says (core.prepare), and its
    description."""
    from pgtraj.core.clean import CleaningOptions
    from pgtraj.core.errors import config_from_dict
    from pgtraj.core.prepare import prepare

    desc = sources.describe(plpy, source, opts)
    log(sources.summary(desc))
    with sources.rows(plpy, desc) as each:
        prepared = prepare(each, config_from_dict(CleaningOptions, cfg.cleaning, "cleaning"), cfg.split_by, log=log)
    return prepared, {k: desc[k] for k in ("source", "shape", "columns", "rows", "incomplete_fixes")}


def train(plpy, name: str, source: str, objective: str, config: str, deploy: str) -> dict:
    begin_procedure(plpy, "pgtraj.train")
    if not MODEL_NAME.match(name or ""):
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
    from pgtraj.core.errors import PgtrajError
    from pgtraj.learn.pipeline import TrainConfig

    opts = json.loads(config)
    if not isinstance(opts, dict):
        raise InferenceError("config must be a JSON object", sqlstate="22023")
    source_opts = {k: opts.pop(k) for k in SOURCE_OPTIONS if k in opts and opts[k] is not None}
    try:
        cfg = TrainConfig.from_dict({**opts, "objective": objective})
    except PgtrajError as exc:
        raise InferenceError(exc.message, sqlstate="22023", hint=exc.hint) from None
    with advisory_lock(plpy, "pgtraj.train", name,
                       InferenceError(f"model {name!r} is being trained by another session", sqlstate="55P03",
                                      hint="SELECT * FROM pgtraj.training_status WHERE status = 'running'")):
        return _run(plpy, name, source, source_opts, cfg, deploy)


def _run(plpy, name, source, source_opts, cfg, deploy) -> dict:
    from dataclasses import asdict

    from pgtraj.runtime.models import cache_dir

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


def _registered_init(plpy, cfg, log):
    """The registered model ``cfg.init_from`` names ('auto': the base model where it suits the run), to
    fine-tune from (a checkpoint file is not a thing a database caller may name: no path from SQL reaches
    the file system)."""
    from pgtraj.core.contract import BASE_MODEL
    from pgtraj.learn.pipeline import AUTO, Pretrained, auto_start

    def weights_of(ref: str) -> Pretrained:
        model_id = plpy.execute(plpy.prepare("SELECT (pgtraj._resolve($1, 'encoder')).model_id AS id", ["text"]),
                                [ref])[0]["id"]
        row = plpy.execute(plpy.prepare(
            "SELECT m.name, m.version, m.objective, m.tokenizer::pg_catalog.text AS tokenizer,"
            " m.config::pg_catalog.text AS config, a.bytes FROM pgtraj.model_registry m"
            " LEFT JOIN pgtraj.model_artifacts a ON a.model_id = m.id AND a.kind = 'weights' WHERE m.id = $1",
            ["int8"]), [model_id])[0]
        if row["bytes"] is None:
            raise InferenceError(f"{row['name']} v{row['version']} has no weights to fine-tune from",
                                 sqlstate="0A000",
                                 hint="models registered before pgtraj 0.2 carry ONNX graphs only: train a new version")
        return Pretrained.registered(f"{row['name']} v{row['version']}", row["bytes"], row["tokenizer"],
                                     json.loads(row["config"]), row["objective"])

    if cfg.init_from == AUTO:
        deployed = plpy.execute(plpy.prepare(
            "SELECT a.model_id IS NOT NULL AS usable FROM pgtraj.deployments d LEFT JOIN pgtraj.model_artifacts a"
            " ON a.model_id = d.model_id AND a.kind = 'weights' WHERE d.name = $1", ["text"]), [BASE_MODEL])
        init, why = auto_start(weights_of(BASE_MODEL) if deployed and deployed[0]["usable"] else None, cfg)
        log(f"training {why}")
        return init
    return weights_of(cfg.init_from) if cfg.init_from else None


def _train_register_deploy(plpy, run_id, name, source, source_opts, cfg, deploy, out_dir) -> dict:
    from pgtraj.core.errors import PgtrajError
    from pgtraj.learn.pipeline import fit_and_export

    def log(message):
        plpy.notice(f"pgtraj.train {name}: {message}")

    try:
        prepared, described = read_source(plpy, source, source_opts, cfg, log)
    except PgtrajError as exc:
        raise InferenceError(exc.message, sqlstate=getattr(exc, "sqlstate", "22023"), hint=exc.hint) from None
    splits = prepared.splits
    log(f"{len(splits['train'])} train / {len(splits['val'])} val pieces from {source}")
    plpy.commit()  # the reading ends here: on Citus, a read over many shards at once and a write to the
    #                registry (reference tables) may not share a transaction
    last = [time.perf_counter()]

    def on_step(step, model, metrics):
        check_interrupts(plpy)  # a cancel (pg_cancel_backend, statement_timeout) stops training here
        if time.perf_counter() - last[0] > 10 or step == cfg.steps:
            last[0] = time.perf_counter()
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            plpy.notice(f"pgtraj.train {name}: step {step}/{cfg.steps}, {shown}")

    labels = prepared.labels if source_opts.get("label_column") else None
    try:
        trained = fit_and_export(splits["train"], splits["val"], cfg, out_dir, labels=labels, progress=False,
                                 log=log, on_step=on_step, init=_registered_init(plpy, cfg, log))
    except PgtrajError as exc:
        raise InferenceError(exc.message, sqlstate="22023", hint=exc.hint) from None
    reg = trained.registration(source_opts.get("label_column"))
    metrics = {**reg["metrics"], "data": {**described, **prepared.record}}
    row = plpy.execute(plpy.prepare(
        "SELECT model_id, version FROM pgtraj._register($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        ["text", "text", "jsonb", "jsonb", "jsonb", "text", "bool", "int4", "int8", "text", "text[]", "bytea[]"]),
        [name, reg["objective"], json.dumps(reg["config"]), json.dumps(reg["tokenizer"]), json.dumps(metrics),
         reg["primary_metric"], reg["higher_is_better"], reg["embedding_dim"], run_id,
         f"trained in the database from {source}", list(reg["artifacts"]), list(reg["artifacts"].values())])[0]
    outcome = f"registered v{row['version']}"
    current = plpy.execute(plpy.prepare(
        "SELECT m.version, (m.metrics OPERATOR(pg_catalog.->>) 'val_loss')::pg_catalog.float8 AS val_loss, m.objective,"
        " m.tokenizer OPERATOR(pg_catalog.=) $2 AS same_tokenizer,"
        " (m.tokenizer OPERATOR(pg_catalog.->) 'config' OPERATOR(pg_catalog.->) 'resolution') OPERATOR(pg_catalog.=)"
        " ($2 OPERATOR(pg_catalog.->) 'config' OPERATOR(pg_catalog.->) 'resolution') AS same_resolution,"
        " (m.metrics OPERATOR(pg_catalog.->>) 'val_move_ce')::pg_catalog.float8 AS val_move_ce"
        " FROM pgtraj.deployments d JOIN pgtraj.model_registry m ON m.id = d.model_id WHERE d.name = $1",
        ["text", "jsonb"]), [name, json.dumps(reg["tokenizer"])])
    new_loss = metrics["val_loss"]
    live = current[0] if current.nrows() else None
    if deploy == "always" or live is None:
        why = ""
    elif live["objective"] != cfg.objective:
        why = f" (the deployed v{live['version']} was trained for {live['objective']})"
    elif live["val_loss"] is None:
        why = f" (the deployed v{live['version']} has no val_loss to compare with)"
    elif not live["same_tokenizer"]:
        # a loss over another vocabulary measures another task; the next-move loss does not depend on it
        new_move = metrics.get("val_move_ce")
        if live["same_resolution"] and live["val_move_ce"] is not None and new_move is not None:
            why = (f" (another tokenizer than v{live['version']}: next-move val_loss {new_move:.4f} <"
                   f" {live['val_move_ce']:.4f})") if new_move < live["val_move_ce"] else None
            unlike = (f", not deployed: v{row['version']} has another tokenizer than the deployed v{live['version']};"
                      f" its next-move val_loss {new_move:.4f} is not better than {live['val_move_ce']:.4f}")
        else:
            why = None
            unlike = (f", not deployed: v{row['version']} has another tokenizer than the deployed"
                      f" v{live['version']}, so their val_loss cannot be compared; compare them on the same trips"
                      " (pgtraj.score) and deploy with pgtraj.deploy")
    elif new_loss < live["val_loss"]:
        why = f" (val_loss {new_loss:.4f} < {live['val_loss']:.4f} of v{live['version']})"
    else:
        why = None  # not better: keep the deployed version
    if deploy == "always" or (deploy == "auto" and why is not None):
        plpy.execute(plpy.prepare("SELECT 1 FROM pgtraj.deploy($1, $2, $3)", ["text", "text", "text"]),
                     [name, str(row["version"]), f"training run {run_id} ({deploy})"])
        outcome += f", deployed{why}"
    elif deploy == "auto" and not live["same_tokenizer"]:
        outcome += unlike
    elif deploy == "auto":
        outcome += (f", not deployed: val_loss {new_loss:.4f} is not better than {current[0]['val_loss']:.4f}"
                    f" of the deployed v{current[0]['version']}")
    return {"run_id": run_id, "model_id": row["model_id"], "version": row["version"], "metrics": metrics,
            "outcome": outcome, "device": trained.result.device}
