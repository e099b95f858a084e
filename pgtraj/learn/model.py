"""The trajectory foundation model: one transformer backbone and its heads; objectives and fine-tuning tasks
are thin wrappers around it (learn/tasks/).

Input per position = token embedding + the sum of its H3 ancestors' embeddings (so rare and fallback cells
share what their region learnt) + move embedding (which neighbour of the previous cell, relative to the way
in: the same everywhere on Earth) + day-of-week and quarter-hour embeddings + a projection of the continuous
features (delta-t, dwell, offset in the cell, speed, heading, interpolated). Pre-norm blocks with rotary
position embeddings (RoPE) in attention. The same module exports to ONNX unchanged (learn/export.py).

The cell vocabulary is the model's local knowledge (where this database's trips go); moves, time and motion
are its core, which carries over to places it never saw: the next-move head names any grid neighbour, and
``hide_cells`` (learn.batches) trains the core to work with cells hidden (UNK), as in a place outside the
vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pgtraj.core.errors import config_from_dict
from pgtraj.core.features import NO_DOW, NO_MINUTE, NO_MOVE, TIMING, WITHOUT_ALTITUDE
from pgtraj.core.tokenizer import N_SLOTS, PAD


@dataclass
class ModelConfig:
    vocab_size: int
    ancestor_vocab_size: int = 1
    ancestor_levels: int = 1
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    dropout: float = 0.1
    rope_base: float = 10000.0
    n_classes: int = 0          # classification head (fine-tuning: transport mode, trajectory-user linking)
    n_continuous: int = WITHOUT_ALTITUDE  # continuous input columns read: 8, or 9 with altitude (features.py)

    def __post_init__(self):
        assert self.d_model % self.n_heads == 0 and (self.d_model // self.n_heads) % 2 == 0

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return config_from_dict(cls, d, "model")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def preset(name: str) -> dict:
        """Sizes from tiny (tests) to ~40M parameters (GPU)."""
        return {"tiny": dict(d_model=32, n_layers=2, n_heads=2, d_ff=64),
                "small": dict(d_model=128, n_layers=4, n_heads=4, d_ff=512),
                "base": dict(d_model=256, n_layers=6, n_heads=8, d_ff=1024),
                "large": dict(d_model=512, n_layers=12, n_heads=8, d_ff=2048)}[name]


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding over the last axis of x: (B, nh, T, hs)."""
    T, hs = x.shape[-2], x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, hs, 2, dtype=torch.float32, device=x.device) / hs))
    ang = torch.arange(T, dtype=torch.float32, device=x.device)[:, None] * inv[None, :]  # (T, hs/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.base = cfg.n_heads, cfg.rope_base
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = cfg.dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.nh, C // self.nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        q, k = rope(q, self.base), rope(k, self.base)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.drop if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model),
                                 nn.Dropout(cfg.dropout))

    def forward(self, x, allowed):
        x = x + self.attn(self.ln1(x), allowed)
        return x + self.mlp(self.ln2(x))


class Backbone(nn.Module):
    """tokens (B, T), dow (B, T), minute (B, T), cont (B, T, F) -> hidden states (B, T, d_model)."""

    def __init__(self, cfg: ModelConfig, ancestors: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=PAD)
        self.anc = nn.Embedding(cfg.ancestor_vocab_size, cfg.d_model, padding_idx=0)
        table = ancestors if ancestors is not None else torch.zeros(cfg.vocab_size, cfg.ancestor_levels, dtype=torch.long)
        self.register_buffer("ancestors", table.long(), persistent=True)  # travels in checkpoints and ONNX
        self.dow = nn.Embedding(NO_DOW + 1, cfg.d_model)        # 7 days + special position
        self.minute = nn.Embedding(NO_MINUTE + 1, cfg.d_model)  # 96 quarter hours + special
        self.move = nn.Embedding(NO_MOVE + 1, cfg.d_model)      # 6 slots, jump, start + special
        self.cont = nn.Linear(cfg.n_continuous, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])

    def forward(self, tokens, dow, minute, cont, move, causal: bool = False):
        x = (self.tok(tokens) + self.anc(self.ancestors[tokens]).sum(dim=2) + self.move(move)
             + self.dow(dow) + self.minute(minute) + self.cont(cont[..., : self.cfg.n_continuous]))
        x = self.drop(x)
        keep = tokens != PAD                                   # (B, T)
        allowed = keep[:, None, None, :]                       # (B, 1, 1, T): never attend to padding
        # masks from index comparisons (not eye/tril): they export to ONNX ops every runtime implements
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        if causal:
            allowed = allowed & (pos[None, :] <= pos[:, None])[None, None]
        # a padded query row with nothing allowed would softmax over -inf only (NaN): let it see itself
        allowed = allowed | (pos[None, :] == pos[:, None])[None, None]
        for block in self.blocks:
            x = block(x, allowed)
        return self.ln_f(x)


def pool(hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean over non-padding positions: (B, T, C) -> (B, C)."""
    keep = (tokens != PAD).unsqueeze(-1).to(hidden.dtype)
    return (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)


class TrajectoryModel(nn.Module):
    """The backbone and every head; objectives and fine-tuning tasks pick the heads they train."""

    def __init__(self, cfg: ModelConfig, ancestors: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.backbone = Backbone(cfg, ancestors)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.backbone.tok.weight  # tied: a cell's input and output embedding agree
        self.move_head = nn.Linear(d, N_SLOTS + 1)      # the next move: a slot of the move frame, or a jump
        self.time_head = nn.Linear(d, 1)                # log1p(seconds to the next cell)
        self.proj = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        # fine-tuning heads; the destination head maps into the tied cell space, so it starts from what
        # pretraining learnt about places
        self.dest_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))
        self.tte_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.classifier = nn.Linear(d, cfg.n_classes) if cfg.n_classes else None

    @classmethod
    def for_tokenizer(cls, tokenizer, sizes: dict) -> "TrajectoryModel":
        """A model whose vocabulary and ancestor table are the tokenizer's; ``sizes`` are the other
        ModelConfig fields (a preset, overrides; unknown keys are refused)."""
        anc = torch.from_numpy(tokenizer.ancestor_table())
        cfg = ModelConfig.from_dict({**sizes, "vocab_size": tokenizer.vocab_size,
                                     "ancestor_vocab_size": int(anc.max()) + 1, "ancestor_levels": anc.shape[1]})
        return cls(cfg, anc)

    def forward(self, run, *inputs):
        """One entry point for every pass, so that a DistributedDataParallel wrapper sees (and synchronises)
        them all: ``run`` is the method to run, e.g. ``model(TrajectoryModel.next_step, *inputs)``. Every
        pass takes the inputs of core.contract.INPUT_NAMES, in that order."""
        return run(self, *inputs)

    def hidden(self, tokens, dow, minute, cont, move) -> torch.Tensor:
        """Bidirectional hidden states (B, T, d_model)."""
        return self.backbone(tokens, dow, minute, cont, move, causal=False)

    def embed(self, tokens, dow, minute, cont, move) -> torch.Tensor:
        """The route embedding: L2-normalised projection of the pooled bidirectional encoding of the trip
        with its absolute time hidden (day and time of day), so that the same route driven another day
        or hour embeds the same; durations, speeds and dwell times stay visible."""
        dow, minute = torch.full_like(dow, NO_DOW), torch.full_like(minute, NO_MINUTE)
        h = self.backbone(tokens, dow, minute, cont, move, causal=False)
        return F.normalize(self.proj(pool(h, tokens)), dim=-1)

    def next_step(self, tokens, dow, minute, cont, move) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Causal pass: hidden states (B, T, d_model), next-move logits (B, T, 7: the six slots of the move
        frame of each position's cell, then a jump) and predicted log1p(seconds to next) (B, T). The
        next-token logits are ``lm_head`` of the hidden states, computed where they are needed (over a
        large vocabulary they cost more than the rest of the model)."""
        h = self.backbone(tokens, dow, minute, cont, move, causal=True)
        return h, self.move_head(h), self.time_head(h).squeeze(-1)

    def destination_logits(self, tokens, dow, minute, cont, move) -> torch.Tensor:
        """Causal pass: logits (B, T, V) of the trip's last cell given each prefix."""
        h = self.backbone(tokens, dow, minute, cont, move, causal=True)
        return self.lm_head(self.dest_head(h))

    def travel_time(self, tokens, dow, minute, cont, move) -> torch.Tensor:
        """log1p(seconds from the first to the last cell) (B,) of a route: its timing is hidden first
        (hide_timing), so only the route and the departure time are seen."""
        h = self.backbone(*hide_timing(tokens, dow, minute, cont, move), causal=False)
        return self.tte_head(pool(h, tokens)).squeeze(-1)

    def classify(self, tokens, dow, minute, cont, move) -> torch.Tensor:
        """Class logits (B, n_classes) from the pooled bidirectional encoding."""
        if self.classifier is None:
            raise ValueError("this model has no classification head (ModelConfig.n_classes = 0)")
        return self.classifier(pool(self.backbone(tokens, dow, minute, cont, move, causal=False), tokens))


def hide_timing(tokens, dow, minute, cont, move):
    """Inputs for travel-time estimation: every position shows the departure's day and quarter hour, and
    the timing features are zeroed, so the elapsed time cannot be read off the input."""
    first = (dow[:, :1] == NO_DOW).long()  # the first cell: position 1 after a BOS, 0 in a window without one
    dow = torch.where(tokens != PAD, dow.gather(1, first).expand_as(dow), dow)
    minute = torch.where(tokens != PAD, minute.gather(1, first).expand_as(minute), minute)
    keep = torch.ones(cont.shape[-1], dtype=cont.dtype, device=cont.device)
    keep[TIMING] = 0.0
    return tokens, dow, minute, cont * keep, move


def count_parameters(model: nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def cosine_lr(step: int, *, warmup: int, total: int, lr: float, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))
