"""The shipped base model: its release is checked against SHA256SUMS, `pgtraj models add base` registers it
once (graphs exported from the shipped weights, parity checked), SQL serves it at once, and the recipe that
builds it runs end to end (on two users, a few steps)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import psycopg
import pytest
import torch

from pgtraj.app import base_model
from pgtraj.core.features import collate, to_inputs
from pgtraj.learn.batches import to_tensors

from .test_datasets import GEOLIFE, needs_data
from .test_inference import LINE
from .test_model import TRIPS


def test_an_altered_release_is_refused(tmp_path):
    copy = tmp_path / "base"
    shutil.copytree(base_model.ASSET_DIR, copy)
    assert base_model.verify(copy)["name"] == "pgtraj-base"
    data = bytearray((copy / "weights.npz").read_bytes())
    data[len(data) // 2] ^= 1
    (copy / "weights.npz").write_bytes(bytes(data))
    with pytest.raises(base_model.BaseModelError, match=r"weights.npz has sha256 .* SHA256SUMS says"):
        base_model.verify(copy)
    (copy / "SHA256SUMS").unlink()
    with pytest.raises(base_model.BaseModelError, match="no base model release"):
        base_model.load(copy)


def test_models_add_base_registers_it_once_and_sql_serves_it(db):
    env = {k: v for k, v in os.environ.items() if k != "PGTRAJ_DSN"}
    for expect in ("registered pgtraj-base v1", "pgtraj-base v1 is already this base model"):
        out = subprocess.run([sys.executable, "-m", "pgtraj", "models", "add", "base", "--dsn", db],
                             capture_output=True, text=True, env=env)
        assert out.returncode == 0 and expect in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-m", "pgtraj", "models", "--dsn", db], capture_output=True, text=True, env=env)
    model, tok, card = base_model.load()
    assert f"dim {card['model']['d_model']}" in out.stdout and f"res 9 {len(tok.vocab):>7,} cells auto" in out.stdout
    with psycopg.connect(db, autocommit=True) as conn:
        graphs, deployed, objective, cells = conn.execute(
            "SELECT artifacts, deployed, objective, vocabulary_cells FROM pgtraj.models WHERE name = 'pgtraj-base'"
        ).fetchone()
        assert cells == len(tok.vocab)
        assert set(graphs) == {"encoder", "next_move", "token_nll", "masked_logp", "weights"}
        assert deployed and objective == card["objective"]
        warm = conn.execute("SELECT pgtraj.warmup('pgtraj-base')").fetchone()[0]
        assert warm["graphs"] == ["encoder", "masked_logp", "next_move", "token_nll"]  # the weights are not served
        trip = TRIPS[3]
        emb, = conn.execute(f"SELECT pgtraj.embed({LINE}, 'pgtraj-base')::text",
                            [trip.lon.tolist(), trip.lat.tolist(), trip.t.tolist()]).fetchone()
        rows = conn.execute(f"SELECT count(*) FROM pgtraj.predict_next({LINE}, 'pgtraj-base')",
                            [trip.lon.tolist(), trip.lat.tolist(), trip.t.tolist()]).fetchone()
    with torch.no_grad():
        want = model.embed(**to_tensors(collate([to_inputs(tok.encode(trip))]))).numpy()[0]
    assert np.abs(np.array(json.loads(emb)) - want).max() < 1e-4  # the database serves the shipped weights
    assert 1 <= rows[0] <= 6


@needs_data
def test_the_recipe_builds_a_release_that_loads(tmp_path):
    config = json.loads((base_model.ASSET_DIR.parents[2] / "training" / "base.json").read_text())
    config.update(preset="tiny", steps=2, eval_every=1, eval_batches=1, warmup=1)
    card = base_model.build(GEOLIFE, config, tmp_path / "run", users=[10, 11], release_dir=tmp_path / "rel",
                            progress=False, log=lambda m: None)
    assert card["steps"] == 2 and card["data"]["users"] == "10-11" and card["tokens_seen"] > 0
    model, tok, loaded = base_model.load(tmp_path / "rel")
    assert loaded == card and model.cfg.d_model == 32
    assert (tmp_path / "run" / "training_curve.png").exists()
