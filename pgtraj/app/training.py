"""Training from a table or a query, on the client (`pgtraj train`, Python): read it as the server describes it
(pgtraj.describe_source: any shape, runtime/sources.py), clean and split it (core.prepare), fit and export
(learn.pipeline), register the model (pgtraj._register) and record the run in pgtraj.training_runs (failed
runs too, with their error). CALL pgtraj.train runs the same steps inside the database."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from pgtraj.core.clean import CleaningConfig, CleaningOptions, CleaningReport, clean
from pgtraj.core.contract import BASE_MODEL, SOURCE_OPTIONS
from pgtraj.core.errors import RegistryError, SourceError, config_from_dict
from pgtraj.core.prepare import Prepared, prepare
from pgtraj.db import registry
from pgtraj.db.connection import connect
from pgtraj.db.readers import QuerySource, TrajectoryReader, _table, source_error
from pgtraj.learn.pipeline import Pretrained, fit_and_export
from pgtraj.learn.pretrained import AUTO, auto_start
from pgtraj.learn.train import TrainConfig, TrainingError, train
from pgtraj.runtime.sources import is_query, summary


def describe_source(conn: psycopg.Connection, source: str, options: dict | None = None) -> dict:
    """pgtraj.describe_source of a table name (resolved with this session's search_path) or a query."""
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    cast = "text" if is_query(source) else "regclass"
    try:
        return conn.execute(f"SELECT pgtraj.describe_source(%s::{cast}, %s)", [source, Jsonb(opts)]).fetchone()[0]
    except psycopg.Error as exc:
        raise source_error(exc) from None



def read_source(conn: psycopg.Connection, source: str, cfg: TrainConfig, options: dict | None = None,
                log=print) -> tuple[Prepared, dict]:
    """Every row of a table or query, cleaned and split as ``cfg`` says (core.prepare), and its description."""
    desc = describe_source(conn, source, options)
    log(summary(desc))
    with conn.transaction(), conn.cursor(name="pgtraj_source", binary=True) as cur:
        cur.itersize = 200
        cur.execute(desc["query"])
        prepared = prepare(cur, config_from_dict(CleaningOptions, cfg.cleaning, "cleaning"), cfg.split_by, log=log)
    return prepared, {k: desc[k] for k in ("source", "shape", "columns", "rows", "incomplete_fixes")}


def read_split(conn: psycopg.Connection, table: str, split: str, *, id_column: str = "id",
               traj_column: str = "geom", split_column: str = "split", log=print) -> list:
    """The cleaned pieces of the rows of ``table`` whose ``split_column`` is ``split``."""
    query = sql.SQL("SELECT {id}, {g} FROM {t} WHERE {s} = %s ORDER BY {id}").format(
        id=sql.Identifier(id_column), g=sql.Identifier(traj_column), t=_table(table), s=sql.Identifier(split_column))
    reader = TrajectoryReader(conn, QuerySource(query.as_string(conn), (split,)))
    report = CleaningReport()
    pieces = [p for tr in reader for p in clean(tr, CleaningConfig(), report)]
    log(f"{split}: {reader.report.summary()}; cleaning: {report.summary()}")
    return pieces


def registered_init(conn: psycopg.Connection, cfg: TrainConfig, log=print) -> Pretrained | None:
    """The registered model ``cfg.init_from`` names ('name': its deployed version, 'name@3'; 'auto': the base
    model where it suits the run), to fine-tune from; None when it is unset or a checkpoint file (learn.train
    reads those)."""
    if cfg.init_from == AUTO:
        try:
            base = _weights_of(registry.load(conn, BASE_MODEL, "deployed"))
        except (RegistryError, TrainingError):
            base = None
        init, why = auto_start(base, cfg)
        log(f"training {why}")
        return init
    if not cfg.init_from or Path(cfg.init_from).is_file():
        return None
    name, _, version = cfg.init_from.partition("@")
    return _weights_of(registry.load(conn, name, version or "deployed"))


def _weights_of(mv: registry.ModelVersion) -> Pretrained:
    if "weights" not in mv.artifacts:
        raise TrainingError(f"{mv.name} v{mv.version} has no weights to fine-tune from",
                            hint="models registered before pgtraj 0.2 carry ONNX graphs only: train a new version")
    return Pretrained.registered(f"{mv.name} v{mv.version}", mv.artifacts["weights"], mv.tokenizer, mv.config,
                                 mv.objective)


def train_and_register(dsn: str, name: str, table: str, cfg: TrainConfig, out_dir: Path, *,
                       deploy: bool = False, progress: bool = True, log=print, **source) -> registry.ModelVersion | None:
    """Train ``name`` on a table or query (``source``: its columns, SOURCE_OPTIONS, where they cannot be found
    by type and name). Under torchrun every rank reads and trains; rank 0 alone records the run and registers
    the model (other ranks return None)."""
    unknown = sorted(set(source) - set(SOURCE_OPTIONS))
    if unknown:
        raise SourceError(f"unknown source options {unknown}", hint=f"known: {list(SOURCE_OPTIONS)}")
    out_dir = Path(out_dir).absolute()
    if int(os.environ.get("RANK", 0)) != 0:
        with connect(dsn) as conn:
            prepared, _ = read_source(conn, table, cfg, source, log=lambda m: None)
            init = registered_init(conn, cfg, log=lambda m: None)
        train(prepared.splits["train"], prepared.splits["val"], cfg, out_dir, labels=prepared.labels or None,
              progress=False, log=lambda m: None, init=init)
        return None
    with connect(dsn, autocommit=True) as conn:
        # the run is opened and closed by this connection's backend (pgtraj._run_start/_run_finish)
        run_id = conn.execute("SELECT pgtraj._run_start(%s, %s, %s, %s)",
                              [name, table, cfg.objective, Jsonb({**asdict(cfg), **source})]).fetchone()[0]
        try:
            prepared, described = read_source(conn, table, cfg, source, log=log)
            labels = prepared.labels if source.get("label_column") else None
            trained = fit_and_export(prepared.splits["train"], prepared.splits["val"], cfg, out_dir, labels=labels,
                                     progress=progress, log=log, init=registered_init(conn, cfg, log=log))
            (out_dir / "tokenizer.json").write_text(trained.result.tokenizer.to_json())
            reg = trained.registration(source.get("label_column"))
            reg["metrics"] = {**reg["metrics"], "data": {**described, **prepared.record}}
            with conn.transaction():
                mv = registry.register(conn, name, **reg, training_run_id=run_id)
                conn.execute("SELECT pgtraj._run_finish(%s, 'succeeded', NULL, %s, %s, %s)",
                             [run_id, Jsonb(reg["metrics"]), f"registered v{mv.version}", trained.result.device])
        except BaseException as exc:  # the run row must say what happened, whatever it was
            conn.execute("SELECT pgtraj._run_finish(%s, %s, %s, NULL, 'nothing registered', NULL)",
                         [run_id, "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed", str(exc)[:4000]])
            raise
        if deploy:
            registry.deploy(conn, name, mv.version, note=f"training run {run_id}")
        parity = trained.metrics["onnx_max_abs_diff"]
        log(f"registered {name} v{mv.version} (training run {run_id}); ONNX parity {parity}; tokenizer, checkpoint"
            f" and curve in {out_dir}")
        return mv
