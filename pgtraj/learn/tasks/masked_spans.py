"""Masked trajectory modelling with span masking, and its graph: masked_logp (every position's
log-probabilities over the vocabulary, read bidirectionally: pgtraj.fill_gaps decodes a gap's path from
them); masked (each position's likeliest cell) is what models before it were registered with."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pgtraj.core.features import NO_MOVE, SPATIAL
from pgtraj.core.tokenizer import MASK, SPECIAL_TOKENS
from pgtraj.learn.model import TrajectoryModel
from pgtraj.learn.tasks import Objective, graph, objective


@objective
class MaskedSpans(Objective):
    """Masked trajectory modelling with span masking: contiguous runs of tokens are hidden (a single hidden
    cell on a contiguous hex path is trivial to recover: it is the intersection of its neighbours' rings).
    80% of masked positions show MASK, 10% a random cell, 10% the original (BERT's recipe)."""

    name = "masked_spans"
    graphs = ("encoder", "masked_logp")  # what a model trained with it is registered with

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
        """Logits (n_masked, V) at the masked positions of the corrupted tokens ``inp``; what would reveal
        where a masked token is is hidden too (hide_masked)."""
        cont, move = hide_masked(batch["cont"], batch["move"], masked)
        h = self.net(TrajectoryModel.hidden, inp, batch["dow"], batch["minute"], cont, move)
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


def hide_masked(cont: torch.Tensor, move: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The features of a masked position that give its cell away: its offset, speed and heading, its move,
    and the move out of it (the next cell's slot in its frame). runtime/tasks/masked.py hides the same."""
    spatial = torch.zeros(cont.shape[-1], dtype=torch.bool, device=cont.device)
    spatial[SPATIAL] = True
    cont = cont.masked_fill(masked.unsqueeze(-1) & spatial, 0.0)
    after = torch.zeros_like(masked)
    after[:, 1:] = masked[:, :-1]
    return cont, move.masked_fill(masked | after, NO_MOVE)


@graph("masked_logp")
def masked_logp(model: TrajectoryModel, tokens, dow, minute, cont, move):
    return torch.log_softmax(model.lm_head(model.hidden(tokens, dow, minute, cont, move)), dim=-1)


@graph("masked")
def masked(model: TrajectoryModel, tokens, dow, minute, cont, move):
    """Each position's likeliest cell and its probability: what models before masked_logp (pgtraj 0.2.0)
    were registered with; pgtraj.fill_gaps still serves those."""
    logits = model.lm_head(model.hidden(tokens, dow, minute, cont, move))
    special = torch.arange(logits.shape[-1], device=logits.device) < len(SPECIAL_TOKENS)
    probs = torch.softmax(logits, dim=-1).masked_fill(special, 0.0)  # a gap is filled with a place
    best, token = probs.max(dim=-1)
    return token, best
