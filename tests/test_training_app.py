"""`pgtraj train`: from a real GeoLife table to a registered model with ONNX graphs and a training-run row."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import psycopg
import pytest

from pgtraj.app.training import train_and_register
from pgtraj.core.errors import SourceError
from pgtraj.db import registry
from pgtraj.db.datasets import load_geolife
from pgtraj.learn.train import TrainConfig

from .test_datasets import GEOLIFE, needs_data

USERS = [53, 60, 90, 107, 117, 72, 87, 108]
TINY = dict(objective="next_cell", preset="tiny", steps=6, batch_size=4, max_len=32, warmup=1, eval_every=3,
            eval_batches=1, min_trajectories=2, tokenizer={"resolution": 8, "min_count": 1})


@needs_data
def test_train_registers_model_and_run(db, tmp_path):
    with psycopg.connect(db) as conn:
        load_geolife(conn, GEOLIFE, users=USERS, progress=False, log=lambda m: None)
    env = {k: v for k, v in os.environ.items() if k != "PGTRAJ_DSN"}
    config = tmp_path / "tiny.json"
    config.write_text(__import__("json").dumps(TINY))
    out = subprocess.run([sys.executable, "-m", "pgtraj", "train", "gl", "--dsn", db, "--config", str(config),
                          "--out", str(tmp_path / "run"), "--deploy"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "training_curve.png").exists()
    with psycopg.connect(db) as conn:
        mv = registry.load(conn, "gl")  # deployed
        assert set(mv.artifacts) == {"encoder", "next_move", "token_nll", "weights"} and mv.metrics["onnx_max_abs_diff"]["encoder"] < 1e-4
        for kind, graph in mv.artifacts.items():  # loadable by onnxruntime straight from the registry
            if kind != "weights":
                ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        assert set(np.load(io.BytesIO(mv.artifacts["weights"]), allow_pickle=False)) >= {"backbone.tok.weight"}
        status, run_metrics = conn.execute(
            "SELECT r.status, r.metrics FROM pgtraj.training_runs r JOIN pgtraj.model_registry m"
            " ON m.training_run_id = r.id WHERE m.id = %s", [mv.id]).fetchone()
        assert status == "succeeded" and run_metrics["val_loss"] > 0


@needs_data
def test_failed_training_is_recorded_and_registers_nothing(db, tmp_path):
    with psycopg.connect(db) as conn:
        load_geolife(conn, GEOLIFE, users=USERS[:2], progress=False, log=lambda m: None)
        conn.execute("UPDATE geolife.trajectories SET split = 'train'")  # no validation split at all
    with pytest.raises(SourceError, match="no .val. trajectories to train with"):
        train_and_register(db, "broken", "geolife.trajectories", TrainConfig.from_dict(TINY), tmp_path,
                           id_column="traj_id", progress=False, log=lambda m: None)
    with psycopg.connect(db) as conn:
        ((status, error),) = conn.execute("SELECT status, error FROM pgtraj.training_runs").fetchall()
        assert status == "failed" and "no 'val' trajectories" in error
        assert conn.execute("SELECT count(*) FROM pgtraj.model_registry").fetchone()[0] == 0


@needs_data
def test_fine_tune_classifier_from_a_label_column(db, tmp_path):
    """Trajectory-user linking through the CLI: pretrain, then fine-tune `classify` on user_id from the
    pretraining checkpoint; the registry keeps the class names and the classify graph."""
    with psycopg.connect(db) as conn:
        load_geolife(conn, GEOLIFE, users=USERS[:4], progress=False, log=lambda m: None)
        users = {str(u) for (u,) in conn.execute("SELECT DISTINCT user_id FROM geolife.trajectories WHERE split = 'train'")}
    env = {k: v for k, v in os.environ.items() if k != "PGTRAJ_DSN"}
    config = tmp_path / "tiny.json"
    config.write_text(__import__("json").dumps({**TINY, "objective": "hybrid"}))
    base = [sys.executable, "-m", "pgtraj", "train", "--dsn", db, "--config", str(config)]
    out = subprocess.run(base + ["pre", "--out", str(tmp_path / "pre")], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    ft = base + ["tul", "--out", str(tmp_path / "tul"), "--objective", "classify",
                 "--init-from", str(tmp_path / "pre" / "checkpoint.pt")]
    out = subprocess.run(ft, capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "needs a label per trajectory" in out.stderr
    out = subprocess.run(ft + ["--label-column", "user_id"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "initialised from" in out.stderr + out.stdout
    with psycopg.connect(db) as conn:
        mv = registry.load(conn, "tul", 1)
    assert set(mv.artifacts) == {"encoder", "classify", "weights"} and set(mv.config["classes"]) == users
    sess = ort.InferenceSession(mv.artifacts["classify"], providers=["CPUExecutionProvider"])
    assert sess.get_outputs()[0].shape[1] == len(users)
