"""LoRA: only the adapters train, fine-tuning starts at the pretrained function, merging changes nothing,
and the merged model exports to ONNX like any other."""

from __future__ import annotations

import torch

from pgtraj.learn.batches import Batches
from pgtraj.learn.export import export, max_abs_diff
from pgtraj.learn.lora import LoRALinear, apply_lora, merge
from pgtraj.learn.tasks.next_cell import NextCell

from .test_model import TOK, TRIPS, batch, make_model


def test_lora_trains_only_adapters_and_merges_exactly():
    model = make_model()
    b = batch(TRIPS[:3])
    with torch.no_grad():
        before = model.next_step(**b)[1]
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    n_trainable = apply_lora(model, r=4, alpha=8)
    assert 0 < n_trainable < 0.2 * sum(p.numel() for p in model.parameters())
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * model.cfg.n_layers
    with torch.no_grad():
        assert torch.allclose(model.next_step(**b)[1], before, atol=1e-6)  # B = 0: same function at start
    obj, data = NextCell(model), Batches(TRIPS, TOK, batch_size=8, max_len=48, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(30):
        loss, _ = obj.loss(data.next())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    # base weights untouched
    for k, v in model.state_dict().items():
        if k.endswith("base.weight") or k.endswith("base.bias"):
            plain = k.replace(".base.", ".")
            assert torch.equal(v, frozen[plain])
    model.eval()
    with torch.no_grad():
        adapted = model.next_step(**b)[1]
    merge(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model.next_step(**b)[1], adapted, atol=1e-5)
        assert not torch.allclose(adapted, before, atol=1e-3)
    onnx_bytes = export(model, "next_move", b)
    assert max_abs_diff(model, "next_move", onnx_bytes, batch(TRIPS[5:9])) < 1e-4
