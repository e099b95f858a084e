"""Training from a table, on the client (`pgtraj train`, Python): read the split table, clean, fit and export
(learn.pipeline), register the model (pgtraj._register) and record the run in pgtraj.training_runs (failed
runs too, with their error). CALL pgtraj.train runs the same pipeline inside the database."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from pgtraj.core.clean import CleaningConfig, CleaningReport, clean
from pgtraj.core.contract import BASE_MODEL
from pgtraj.core.errors import RegistryError
from pgtraj.db import registry
from pgtraj.db.connection import connect
from pgtraj.db.readers import QuerySource, TrajectoryReader, _table
from pgtraj.learn.pipeline import Pretrained, fit_and_export
from pgtraj.learn.pretrained import AUTO, auto_start
from pgtraj.learn.train import TrainConfig, TrainingError, train


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


def read_labels(conn: psycopg.Connection, table: str, *, id_column: str, label_column: str) -> dict:
    """trajectory id -> label (as text) for every row with a non-NULL label."""
    query = sql.SQL("SELECT {id}, {label}::text FROM {t} WHERE {label} IS NOT NULL").format(
        id=sql.Identifier(id_column), label=sql.Identifier(label_column), t=_table(table))
    return dict(conn.execute(query).fetchall())


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


def train_and_register(dsn: str, name: str, table: str, cfg: TrainConfig, out_dir: Path, *, id_column: str = "id",
                       traj_column: str = "geom", split_column: str = "split", label_column: str | None = None,
                       deploy: bool = False, progress: bool = True, log=print) -> registry.ModelVersion | None:
    """Under torchrun every rank reads and trains; rank 0 alone records the run and registers the model
    (other ranks return None). ``label_column`` names the per-trajectory label of the classify objective."""
    columns = dict(id_column=id_column, traj_column=traj_column, split_column=split_column)
    if int(os.environ.get("RANK", 0)) != 0:
        with connect(dsn) as conn:
            splits = [read_split(conn, table, s, **columns, log=lambda m: None) for s in ("train", "val")]
            labels = read_labels(conn, table, id_column=id_column, label_column=label_column) if label_column else None
            init = registered_init(conn, cfg, log=lambda m: None)
        train(*splits, cfg, out_dir, labels=labels, progress=False, log=lambda m: None, init=init)
        return None
    with connect(dsn, autocommit=True) as conn:
        # the run is opened and closed by this connection's backend (pgtraj._run_start/_run_finish)
        run_id = conn.execute("SELECT pgtraj._run_start(%s, %s, %s, %s)",
                              [name, table, cfg.objective, Jsonb(asdict(cfg))]).fetchone()[0]
        try:
            train_set = read_split(conn, table, "train", **columns, log=log)
            val_set = read_split(conn, table, "val", **columns, log=log)
            labels = read_labels(conn, table, id_column=id_column, label_column=label_column) if label_column else None
            trained = fit_and_export(train_set, val_set, cfg, out_dir, labels=labels, progress=progress, log=log,
                                     init=registered_init(conn, cfg, log=log))
            with conn.transaction():
                mv = registry.register(conn, name, **trained.registration(label_column), training_run_id=run_id)
                conn.execute("SELECT pgtraj._run_finish(%s, 'succeeded', NULL, %s, %s, %s)",
                             [run_id, Jsonb(trained.metrics), f"registered v{mv.version}", trained.result.device])
        except BaseException as exc:  # the run row must say what happened, whatever it was
            conn.execute("SELECT pgtraj._run_finish(%s, %s, %s, NULL, 'nothing registered', NULL)",
                         [run_id, "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed", str(exc)[:4000]])
            raise
        if deploy:
            registry.deploy(conn, name, mv.version, note=f"training run {run_id}")
        parity = trained.metrics["onnx_max_abs_diff"]
        log(f"registered {name} v{mv.version} (training run {run_id}); ONNX parity {parity}")
        return mv
