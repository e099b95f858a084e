"""ONNX export: parity with torch on batches of other sizes and lengths than the export example, and the
graphs run where inference runs, in the PL/Python environment that has no torch."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from pgtraj.core.contract import GRAPHS, INPUT_NAMES
from pgtraj.core.tokenizer import JUMP
from pgtraj.learn.export import export, max_abs_diff, torch_outputs

from .conftest import CACHE
from .test_model import TRIPS, batch, make_model


@pytest.fixture(scope="module")
def trained():
    # a few optimiser steps so that parity is checked on non-initial weights
    from pgtraj.learn.batches import Batches
    from pgtraj.learn.tasks.next_cell import NextCell

    from .test_model import TOK

    model = make_model(seed=1, n_classes=3)  # every head present, classify included
    obj, data = NextCell(model), Batches(TRIPS, TOK, batch_size=8, max_len=48, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(5):
        loss, _ = obj.loss(data.next())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("kind", sorted(GRAPHS))
def test_parity_with_torch(trained, kind):
    onnx_bytes = export(trained, kind, batch(TRIPS[:2]))
    for trips in (TRIPS[10:11], TRIPS[20:37]):  # batch 1 and 17, other lengths than the example
        diff = max_abs_diff(trained, kind, onnx_bytes, batch(trips))
        assert diff < 1e-4, f"{kind}: max abs diff {diff}"


@pytest.mark.parametrize("kind", ["next_move", "next_cell"])
def test_next_step_graphs_read_each_sequence_at_its_last_real_token(trained, kind):
    b = batch([TRIPS[1], max(TRIPS, key=len)])
    probs, _ = torch_outputs(trained, kind, b)
    alone, _ = torch_outputs(trained, kind, batch([TRIPS[1]]))
    assert np.allclose(probs[0], alone[0], atol=1e-5)  # padding of the short one changes nothing
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_onnx_runs_without_torch(trained, tmp_path):
    path = tmp_path / "encoder.onnx"
    path.write_bytes(export(trained, "encoder", batch(TRIPS[:2])))
    b = batch(TRIPS[3:6])
    np.savez(tmp_path / "in.npz", **{n: b[n].numpy() for n in INPUT_NAMES})
    want = torch_outputs(trained, "encoder", b)[0]
    np.save(tmp_path / "want.npy", want)
    code = f"""
import sys, numpy as np, onnxruntime as ort
x = dict(np.load({str(tmp_path / 'in.npz')!r}))
out = ort.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider']).run(None, x)[0]
assert 'torch' not in sys.modules
assert np.max(np.abs(out - np.load({str(tmp_path / 'want.npy')!r}))) < 1e-4
"""
    proc = subprocess.run([str(CACHE / "runtime-venv" / "bin" / "python"), "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_token_nll_agrees_with_next_move_on_prefixes(trained):
    b = batch([TRIPS[4]])
    (nll,) = torch_outputs(trained, "token_nll", b)
    n = int((b["tokens"] != 0).sum())
    moves = b["move"][0].tolist()
    checked = 0
    for p in range(1, n - 1):  # position p predicts the move to cell p + 1 from the prefix 0..p
        if moves[p + 1] > JUMP:  # no move to score (the first cell after BOS)
            assert nll[0, p] == 0.0
            continue
        prefix = {k: v[:, :p + 1] for k, v in b.items()}
        probs, _ = torch_outputs(trained, "next_move", prefix)
        assert np.isclose(nll[0, p], -np.log(probs[0, moves[p + 1]]), rtol=1e-4)
        checked += 1
    assert checked >= n // 2
    assert nll[0, n - 1] == 0.0  # nothing follows the last token
