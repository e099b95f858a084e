"""The training loop: determinism, resume after an interruption, NaN, out of memory, bad configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pgtraj.core.errors import ConfigError
from pgtraj.core.synthetic import grid_trips
from pgtraj.learn.train import TrainConfig, TrainingError, train

TRIPS = grid_trips(60, seed=4)
TRAIN, VAL = TRIPS[:50], TRIPS[50:]


def cfg(**over) -> TrainConfig:
    base = dict(objective="next_cell", preset="tiny", steps=20, batch_size=8, max_len=48, lr=3e-3, warmup=2,
                eval_every=10, eval_batches=2, tokenizer={"resolution": 9, "min_count": 2, "coarsest_resolution": 6},
                model={"dropout": 0.1})
    return TrainConfig.from_dict({**base, **over})


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_training_writes_metrics_curve_and_is_deterministic(tmp_path):
    a = train(TRAIN, VAL, cfg(), tmp_path / "a", progress=False, log=lambda m: None)
    b = train(TRAIN, VAL, cfg(), tmp_path / "b", progress=False, log=lambda m: None)
    assert torch.equal(weights(a.model), weights(b.model))
    rows = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert sum("val_loss" in r for r in rows) == 2
    assert (tmp_path / "a" / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert a.metrics["tokens_per_second"] > 0 and a.metrics["val_loss"] > 0


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    straight = train(TRAIN, VAL, cfg(), tmp_path / "straight", progress=False, log=lambda m: None)

    def crash(step, model, metrics):
        if step == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TRAIN, VAL, cfg(), tmp_path / "resumed", progress=False, log=lambda m: None, on_step=crash)
    messages = []
    resumed = train(TRAIN, VAL, cfg(), tmp_path / "resumed", progress=False, log=messages.append)
    assert any("resuming from step 10" in m for m in messages)
    assert torch.equal(weights(straight.model), weights(resumed.model))
    steps = [json.loads(l)["step"] for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    def poison(step, model, metrics):
        if step == 12:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingError, match="loss became nan at step 12") as err:
        train(TRAIN, VAL, cfg(), tmp_path, progress=False, log=lambda m: None, on_step=poison)
    assert "checkpoint.pt" in err.value.hint
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 10 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_out_of_memory_halves_the_batch_and_continues(tmp_path):
    seen = []

    def oom_once(step, model, metrics):
        if step == 5 and not seen:
            seen.append(step)
            raise torch.OutOfMemoryError("simulated")

    messages = []
    result = train(TRAIN, VAL, cfg(), tmp_path, progress=False, log=messages.append, on_step=oom_once)
    assert result.metrics["batch_size_final"] == 4 and any("batch size 4" in m for m in messages)


@pytest.mark.parametrize("over, text", [
    ({"objective": "telepathy"}, "unknown objective"),
    ({"stepz": 3}, "unknown training config keys"),
])
def test_bad_configs(over, text):
    with pytest.raises(ConfigError, match=text):
        cfg(**over)


@pytest.mark.parametrize("over, text", [
    ({"model": {"d_modle": 8}}, "unknown model config keys: \\['d_modle'\\]"),
    ({"tokenizer": {"res": 9}}, "unknown tokenizer config keys"),
])
def test_bad_nested_configs(tmp_path, over, text):
    with pytest.raises(ConfigError, match=text):
        train(TRAIN, VAL, cfg(**over), tmp_path, progress=False, log=lambda m: None)


def test_too_little_data_and_no_validation(tmp_path):
    with pytest.raises(TrainingError, match="need at least"):
        train(TRAIN[:3], VAL, cfg(), tmp_path, progress=False)
    with pytest.raises(TrainingError, match="no validation"):
        train(TRAIN, [], cfg(), tmp_path, progress=False)


def test_resume_with_another_config_is_refused(tmp_path):
    train(TRAIN, VAL, cfg(steps=10), tmp_path, progress=False, log=lambda m: None)
    with pytest.raises(TrainingError, match="another training config"):
        train(TRAIN, VAL, cfg(steps=10, lr=1e-2), tmp_path, progress=False, log=lambda m: None)


def test_fine_tuning_starts_from_the_pretrained_weights_and_vocabulary(tmp_path):
    pre = train(TRAIN, VAL, cfg(objective="masked_spans", steps=10), tmp_path / "pre", progress=False,
                log=lambda m: None)
    seen = {}

    def first_step(step, model, metrics):
        if step == 1:
            seen["w"] = model.backbone.anc.weight.detach().clone()

    messages = []
    ft = train(TRAIN[:30], VAL, cfg(steps=5, init_from=str(tmp_path / "pre" / "checkpoint.pt")), tmp_path / "ft",
               progress=False, log=messages.append, on_step=first_step)
    assert any("initialised from" in m and "masked_spans" in m for m in messages)
    assert np.array_equal(ft.tokenizer.vocab, pre.tokenizer.vocab)  # even though fit data differ
    # one small step away from the pretrained weights, not from a random init
    assert (seen["w"] - pre.model.backbone.anc.weight).abs().max() < 0.01
    with pytest.raises(TrainingError, match="another model shape"):
        train(TRAIN, VAL, cfg(steps=5, preset="small", init_from=str(tmp_path / "pre" / "checkpoint.pt")),
              tmp_path / "bad", progress=False, log=lambda m: None)


@pytest.mark.parametrize("objective", ["next_cell", "hybrid"])
def test_torchrun_two_cpu_processes(tmp_path, objective):
    """Data-parallel training with torchrun on gloo: ranks draw different batches, DDP averages gradients,
    so both end with the same weights, and different ones than a single process would."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("ddp_train.py")
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), objective, str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (out / "weights-0.sha").read_text(), (out / "weights-1.sha").read_text()
    assert a == b
    assert json.loads((out / "final_metrics.json").read_text())["processes"] == 2
    single = tmp_path / "single"
    proc = subprocess.run([sys.executable, str(script), objective, str(single)], capture_output=True, text=True,
                          env={**__import__("os").environ, "RANK": "0", "WORLD_SIZE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (single / "weights-0.sha").read_text() != a


def test_lora_fine_tuning_run_resumes_and_returns_a_merged_model(tmp_path):
    from pgtraj.learn.lora import LoRALinear

    pre = train(TRAIN, VAL, cfg(objective="masked_spans", steps=10), tmp_path / "pre", progress=False,
                log=lambda m: None)
    lora_cfg = cfg(steps=20, init_from=str(tmp_path / "pre" / "checkpoint.pt"), lora={"r": 4, "alpha": 8})
    messages = []
    straight = train(TRAIN, VAL, lora_cfg, tmp_path / "a", progress=False, log=messages.append)
    assert any(m.startswith("LoRA") for m in messages)
    assert not any(isinstance(m, LoRALinear) for m in straight.model.modules())
    # embeddings are frozen under LoRA; attention projections moved
    assert torch.equal(straight.model.backbone.tok.weight, pre.model.backbone.tok.weight)
    assert not torch.equal(straight.model.backbone.blocks[0].attn.qkv.weight, pre.model.backbone.blocks[0].attn.qkv.weight)

    def crash(step, model, metrics):
        if step == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TRAIN, VAL, lora_cfg, tmp_path / "b", progress=False, log=lambda m: None, on_step=crash)
    resumed = train(TRAIN, VAL, lora_cfg, tmp_path / "b", progress=False, log=lambda m: None)
    assert torch.equal(weights(straight.model), weights(resumed.model))


@pytest.mark.parametrize("bad, words", [
    ({"tokenizer": {"resolution": 4}}, "resolution must be 5-12"),
    ({"tokenizer": {"resolution": "fine"}}, "resolution must be an integer"),
    ({"cleaning": {"profile": "spaceship"}}, "unknown cleaning profile"),
    ({"cleaning": {"max_discard": -0.1}}, "max_discard"),
    ({"split_by": "coin"}, "split_by must be"),
    ({"tokenizer": {"timezone": "Mars/Olympus"}}, "unknown timezone"),
    ({"tokenizer": {"resolutoin": 9}}, "resolutoin"),
    ({"preset": "huge"}, "unknown preset"),
    ({"vocabulary": "borrowed"}, "vocabulary must be"),
    ({"hide_cells": 1.5}, "hide_cells"),
    ({"hard_negatives": -0.5}, "hard_negatives"),
])
def test_a_bad_config_is_refused_before_any_data_is_read(bad, words):
    from pgtraj.core.errors import PgtrajError

    with pytest.raises(PgtrajError, match=words):
        TrainConfig.from_dict({"objective": "next_cell", **bad})
