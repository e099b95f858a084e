"""Low-rank adaptation (LoRA, Hu et al. 2021) for parameter-efficient fine-tuning: the pretrained weights are
frozen and each adapted Linear learns W + (alpha / r) * B @ A with A (r x in), B (out x r), B starting at zero
(so fine-tuning starts exactly at the pretrained model). ``merge`` folds the update back into plain Linear
layers, so export and inference see an ordinary model."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        for p in base.parameters():
            p.requires_grad = False

    def forward(self, x):
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * self.B @ self.A)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, targets: tuple[str, ...] = ("qkv", "out")) -> int:
    """Freeze ``model`` and put LoRA adapters on every Linear whose attribute name is in ``targets`` (the
    attention projections by default). Heads a task adds afterwards stay trainable. Returns trainable count."""
    for p in model.parameters():
        p.requires_grad = False
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, r, alpha))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by the equivalent plain Linear (in place); returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model
