"""Pretraining objectives as thin wrappers around one TrajectoryModel (in the x-transformers manner).
Each takes batches from data.Batches and returns (loss, metrics).

Passes go through ``self.net`` (the model, or its DistributedDataParallel wrapper set with ``use``);
``self.model`` is the bare model, for its configuration and heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .model import TrajectoryModel
from .tokenizer import MASK, PAD, SPECIAL_TOKENS

INPUTS = ("tokens", "dow", "minute", "cont")

# continuous feature columns that reveal where a masked token is (offset in cell, speed, heading)
_SPATIAL = [2, 3, 4, 5, 6]


class Objective:
    tail_windows = False   # windows of long trips end at the trip's end (the target lives there)
    needs_labels = False   # batches carry a per-trajectory "label"

    def __init__(self, model: TrajectoryModel):
        self.model = self.net = model

    def use(self, net) -> None:
        """Run passes through ``net`` (e.g. DistributedDataParallel(model))."""
        self.net = net


class NextCell(Objective):
    """GPT-style: predict each next token (and log1p seconds until it) from the prefix."""

    name = "next_cell"

    def __init__(self, model: TrajectoryModel, time_weight: float = 0.1):
        super().__init__(model)
        self.time_weight = time_weight

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        logits, dt_pred = self.net("next", *(batch[k] for k in INPUTS))
        target = batch["tokens"][:, 1:]
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=PAD)
        real = target != PAD
        # feature 0 of the next position is log1p(dt)/5: the time it takes to get there
        dt_target = batch["cont"][:, 1:, 0] * 5.0
        time_loss = F.smooth_l1_loss(dt_pred[:, :-1][real], dt_target[real])
        with torch.no_grad():
            acc = (logits[:, :-1].argmax(-1) == target)[real].float().mean()
        return ce + self.time_weight * time_loss, {"ce": ce.item(), "time_l1": time_loss.item(), "acc@1": acc.item()}


class MaskedSpans(Objective):
    """Masked trajectory modelling with span masking: contiguous runs of tokens are hidden (a single hidden
    cell on a contiguous hex path is trivial to recover: it is the intersection of its neighbours' rings).
    80% of masked positions show MASK, 10% a random cell, 10% the original (BERT's recipe)."""

    name = "masked_spans"

    def __init__(self, model: TrajectoryModel, ratio: float = 0.15, mean_span: float = 3.0, max_span: int = 10):
        super().__init__(model)
        self.ratio, self.mean_span, self.max_span = ratio, mean_span, max_span

    def mask(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Boolean (B, T): spans of geometric length covering about ``ratio`` of the real tokens."""
        B, T = tokens.shape
        maskable = tokens >= len(SPECIAL_TOKENS)
        out = torch.zeros_like(maskable)
        for b in range(B):
            idx = maskable[b].nonzero().squeeze(-1)
            budget = max(1, int(round(self.ratio * len(idx))))
            tries = 0
            while int(out[b].sum()) < budget and tries < 4 * budget and len(idx):
                tries += 1
                u = float(torch.rand(1, generator=generator))  # geometric span length with mean mean_span
                length = min(self.max_span, 1 + int(math.log(max(u, 1e-12)) / math.log(1 - 1 / self.mean_span)))
                start = int(idx[torch.randint(len(idx), (1,), generator=generator)])
                out[b, start:start + length] = True
        return out & maskable

    def masked_logits(self, inp: torch.Tensor, batch: dict, masked: torch.Tensor) -> torch.Tensor:
        """Logits (n_masked, V) at the masked positions of the corrupted tokens ``inp``; the continuous
        features that would reveal where a masked token is are hidden too."""
        cont = batch["cont"].clone()
        cont[..., _SPATIAL] = cont[..., _SPATIAL] * (~masked).unsqueeze(-1)
        h = self.net("hidden", inp, batch["dow"], batch["minute"], cont)
        return self.model.lm_head(h[masked])  # tied to the token embedding: the same leaf DDP syncs

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        tokens = batch["tokens"]
        masked = self.mask(tokens)
        r = torch.rand(tokens.shape, device=tokens.device)
        random_cells = torch.randint(len(SPECIAL_TOKENS), self.model.cfg.vocab_size, tokens.shape, device=tokens.device)
        inp = torch.where(masked & (r < 0.8), torch.full_like(tokens, MASK), tokens)
        inp = torch.where(masked & (r >= 0.8) & (r < 0.9), random_cells, inp)
        logits = self.masked_logits(inp, batch, masked)
        ce = F.cross_entropy(logits, tokens[masked])
        with torch.no_grad():
            acc = (logits.argmax(-1) == tokens[masked]).float().mean()
        return ce, {"mlm_ce": ce.item(), "mlm_acc": acc.item(), "masked": int(masked.sum())}


class Contrastive(Objective):
    """InfoNCE between two augmented views of the same trips (TrajCL-style): each view must find its twin
    among the batch."""

    name = "contrastive"

    def __init__(self, model: TrajectoryModel, temperature: float = 0.07):
        super().__init__(model)
        self.temperature = temperature

    def loss(self, views: tuple[dict, dict]) -> tuple[torch.Tensor, dict]:
        a, b = (self.net("embed", *(v[k] for k in INPUTS)) for v in views)
        sim = a @ b.T / self.temperature
        target = torch.arange(len(a), device=a.device)
        loss = (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target)) / 2
        with torch.no_grad():
            acc = (sim.argmax(-1) == target).float().mean()
        return loss, {"nce": loss.item(), "twin_acc": acc.item()}


class Hybrid(Objective):
    """Weighted masked-span + contrastive loss, as surveyed in "Spatio-Temporal Trajectory Foundation Model"."""

    name = "hybrid"

    def __init__(self, model: TrajectoryModel, weight: float = 0.5):
        super().__init__(model)
        self.mlm, self.cl, self.weight = MaskedSpans(model), Contrastive(model), weight

    def use(self, net) -> None:
        super().use(net)
        self.mlm.use(net)
        self.cl.use(net)

    def loss(self, batch_and_views: tuple[dict, tuple[dict, dict]]) -> tuple[torch.Tensor, dict]:
        batch, views = batch_and_views
        l1, m1 = self.mlm.loss(batch)
        l2, m2 = self.cl.loss(views)
        return self.weight * l1 + (1 - self.weight) * l2, {**m1, **m2}


def _last_real(tokens: torch.Tensor) -> torch.Tensor:
    return ((tokens != PAD).sum(1) - 1).clamp_min(0)


class Destination(Objective):
    """Fine-tuning: the trip's last cell from every prefix (causal). Windows end where the trip ends."""

    name = "destination"
    tail_windows = True

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        tokens = batch["tokens"]
        logits = self.net("destination", *(batch[k] for k in INPUTS))
        last = _last_real(tokens)
        rows = torch.arange(len(tokens), device=tokens.device)
        target = tokens[rows, last]
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        # prefixes ending at positions 1..last-1: at least one cell seen, the destination not yet reached
        use = (pos[None, :] >= 1) & (pos[None, :] < last[:, None])
        if not use.any():
            return logits.sum() * 0.0, {"dest_ce": 0.0, "dest_acc": 0.0}
        tgt = target[:, None].expand_as(tokens)[use]
        ce = F.cross_entropy(logits[use], tgt)
        with torch.no_grad():
            acc = (logits[use].argmax(-1) == tgt).float().mean()
        return ce, {"dest_ce": ce.item(), "dest_acc": acc.item()}


def elapsed_log1p(batch: dict) -> torch.Tensor:
    """log1p(seconds from the first to the last real position) of each sequence, from the dt feature."""
    dt = torch.expm1(batch["cont"][..., 0] * 5.0)
    real = batch["tokens"] != PAD
    real[:, :2] = False  # BOS, and the first cell's dt (time since a cell before the window)
    return torch.log1p((dt * real).sum(1))


class TravelTime(Objective):
    """Fine-tuning: travel-time estimation. The route (cells, offsets, headings) and the departure time are
    shown, every timing feature is hidden; the target is log1p(seconds from first to last cell)."""

    name = "travel_time"

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        target = elapsed_log1p(batch)
        pred = self.net("travel_time", *(batch[k] for k in INPUTS))
        loss = F.smooth_l1_loss(pred, target)
        with torch.no_grad():
            mae = (torch.expm1(pred) - torch.expm1(target)).abs().mean()
        return loss, {"tte_l1": loss.item(), "tte_mae_s": mae.item()}


class Classify(Objective):
    """Fine-tuning: one label per trajectory (transport mode, user for trajectory-user linking)."""

    name = "classify"
    needs_labels = True

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = self.net("classify", *(batch[k] for k in INPUTS))
        ce = F.cross_entropy(logits, batch["label"])
        with torch.no_grad():
            acc = (logits.argmax(-1) == batch["label"]).float().mean()
        return ce, {"cls_ce": ce.item(), "cls_acc": acc.item()}


OBJECTIVES = {o.name: o for o in (NextCell, MaskedSpans, Contrastive, Hybrid, Destination, TravelTime, Classify)}


def batch_for(objective, batches) -> object:
    """What an objective's loss() takes, drawn from a data.Batches."""
    if isinstance(objective, Contrastive):
        return batches.views()
    if isinstance(objective, Hybrid):
        return batches.next(), batches.views()
    return batches.next()
