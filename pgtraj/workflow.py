"""Database-to-registry training: read a split table, clean, train, export ONNX (with a parity check),
register the model, and record the run in pgtraj.training_runs (failed runs too, with their error)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from . import registry
from .clean import CleaningConfig, CleaningReport, clean
from .connection import connect
from .export import example_batch, export_checked
from .io import QuerySource, TrajectoryReader, _table
from .train import TrainConfig, TrainingError, train


def read_split(conn: psycopg.Connection, table: str, split: str, *, id_col: str, geom_col: str,
               split_col: str, log=print) -> list:
    query = sql.SQL("SELECT {id}, {g} FROM {t} WHERE {s} = %s ORDER BY {id}").format(
        id=sql.Identifier(id_col), g=sql.Identifier(geom_col), t=_table(table), s=sql.Identifier(split_col))
    reader = TrajectoryReader(conn, QuerySource(query.as_string(conn), (split,)))
    report = CleaningReport()
    pieces = [p for tr in reader for p in clean(tr, CleaningConfig(), report)]
    log(f"{split}: {reader.report.summary()}; cleaning: {report.summary()}")
    return pieces


def read_labels(conn: psycopg.Connection, table: str, *, id_col: str, label_col: str) -> dict:
    """trajectory id -> label (as text) for every row with a non-NULL label."""
    query = sql.SQL("SELECT {id}, {label}::text FROM {t} WHERE {label} IS NOT NULL").format(
        id=sql.Identifier(id_col), label=sql.Identifier(label_col), t=_table(table))
    return dict(conn.execute(query).fetchall())


def train_and_register(dsn: str, name: str, table: str, cfg: TrainConfig, out_dir: Path, *, id_col: str = "id",
                       geom_col: str = "geom", split_col: str = "split", label_col: str | None = None,
                       deploy: bool = False, progress: bool = True, log=print) -> registry.ModelVersion | None:
    """Under torchrun every rank reads and trains; rank 0 alone records the run and registers the model
    (other ranks return None). ``label_col`` names the per-trajectory label of the classify objective."""
    if int(os.environ.get("RANK", 0)) != 0:
        with connect(dsn) as conn:
            splits = [read_split(conn, table, s, id_col=id_col, geom_col=geom_col, split_col=split_col,
                                 log=lambda m: None) for s in ("train", "val")]
            labels = read_labels(conn, table, id_col=id_col, label_col=label_col) if label_col else None
        train(*splits, cfg, out_dir, labels=labels, progress=False, log=lambda m: None)
        return None
    with connect(dsn, autocommit=True) as conn:
        # the run is opened and closed by this connection's backend (pgtraj._run_start/_run_finish)
        run_id = conn.execute("SELECT pgtraj._run_start(%s, %s, %s, %s)",
                              [name, table, cfg.objective, Jsonb(asdict(cfg))]).fetchone()[0]
        try:
            train_set = read_split(conn, table, "train", id_col=id_col, geom_col=geom_col, split_col=split_col, log=log)
            val_set = read_split(conn, table, "val", id_col=id_col, geom_col=geom_col, split_col=split_col, log=log)
            labels = read_labels(conn, table, id_col=id_col, label_col=label_col) if label_col else None
            result = train(train_set, val_set, cfg, out_dir, labels=labels, progress=progress, log=log)
            example = example_batch(result.tokenizer, val_set, cfg.max_len)
            try:
                artifacts, parity = export_checked(result.model, cfg.objective, example)
            except ValueError as exc:
                raise TrainingError(str(exc), hint="this is a bug") from None
            metrics = {**result.metrics, "onnx_max_abs_diff": parity}
            with conn.transaction():
                mv = registry.register(
                    conn, name, objective=cfg.objective, tokenizer=json.loads(result.tokenizer.to_json()),
                    artifacts=artifacts, config={"train": asdict(cfg), "model": result.model_config.to_dict(),
                                                 "classes": result.classes, "label_column": label_col},
                    metrics=metrics, primary_metric="val_loss", higher_is_better=False,
                    embedding_dim=result.model_config.d_model, training_run_id=run_id)
                conn.execute("SELECT pgtraj._run_finish(%s, 'succeeded', NULL, %s, %s, %s)",
                             [run_id, Jsonb(metrics), f"registered v{mv.version}", result.device])
        except BaseException as exc:  # the run row must say what happened, whatever it was
            conn.execute("SELECT pgtraj._run_finish(%s, %s, %s, NULL, 'nothing registered', NULL)",
                         [run_id, "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed", str(exc)[:4000]])
            raise
        if deploy:
            registry.deploy(conn, name, mv.version, note=f"training run {run_id}")
        log(f"registered {name} v{mv.version} (training run {run_id}); ONNX parity {parity}")
        return mv
