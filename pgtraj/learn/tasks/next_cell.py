"""GPT-style next-step prediction, and its graphs: next_move (the next move and the time until it, for
pgtraj.predict_next and predict_path) and token_nll (each step's surprise, for pgtraj.score).

The target is the next *move*: which of the current cell's grid neighbours comes next, counted from
straight on (core.tokenizer.move_frames), or a jump. A move names a cell anywhere, also where the vocabulary
has no token (a coarse fallback cell or UNK), and means the same in every city. The next vocabulary token
is learnt alongside (``vocab_weight``): it trains the cell embeddings the move head reads, and the
destination and masked heads that share them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pgtraj.core.features import LOG_DT, LOG_TIME_SCALE
from pgtraj.core.tokenizer import JUMP, PAD
from pgtraj.learn.model import TrajectoryModel
from pgtraj.learn.tasks import Objective, graph, last_real, objective


def move_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's next move (B, T-1) and where there is one to predict (a real next cell that is not
    a trajectory's first)."""
    nxt = batch["move"][:, 1:]
    return nxt.clamp_max(JUMP), (nxt <= JUMP) & (batch["tokens"][:, 1:] != PAD)


@objective
class NextCell(Objective):
    """GPT-style: predict each next move, token and log1p seconds until it from the prefix."""

    name = "next_cell"
    graphs = ("encoder", "next_move", "token_nll")  # what a model trained with it is registered with

    def __init__(self, model: TrajectoryModel, time_weight: float = 0.1, vocab_weight: float = 0.5,
                 vocab_positions: int = 512):
        super().__init__(model)
        self.time_weight, self.vocab_weight, self.vocab_positions = time_weight, vocab_weight, vocab_positions

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        h, move_logits, dt_pred = self.net(TrajectoryModel.next_step, *self.inputs(batch))
        target = batch["tokens"][:, 1:]
        real = target != PAD
        # the next token at a random sample of positions (the full softmax at every position would cost
        # more than the rest of the step), none where the cells were hidden (learn.batches: hide_cells)
        known = real & ~batch["cells_hidden"][:, None] if "cells_hidden" in batch else real
        pick = known.flatten().nonzero().squeeze(-1)
        pick = pick[torch.randperm(len(pick), device=pick.device)[: self.vocab_positions]]
        ce = F.cross_entropy(self.model.lm_head(h[:, :-1].reshape(-1, h.shape[-1])[pick]), target.flatten()[pick]) \
            if len(pick) else h.sum() * 0.0
        moves, has_move = move_targets(batch)
        move_ce = F.cross_entropy(move_logits[:, :-1][has_move], moves[has_move]) if has_move.any() \
            else move_logits.sum() * 0.0
        # the next position's log1p(dt) feature: the time it takes to get there
        dt_target = batch["cont"][:, 1:, LOG_DT] * LOG_TIME_SCALE
        time_loss = F.smooth_l1_loss(dt_pred[:, :-1][real], dt_target[real])
        with torch.no_grad():
            acc = (move_logits[:, :-1].argmax(-1) == moves)[has_move].float().mean()
        return (move_ce + self.vocab_weight * ce + self.time_weight * time_loss,
                {"move_ce": move_ce.item(), "ce": ce.item(), "time_l1": time_loss.item(), "move_acc@1": acc.item()})


@graph("next_move")
def next_move(model: TrajectoryModel, tokens, dow, minute, cont, move):
    _, move_logits, dt = model.next_step(tokens, dow, minute, cont, move)
    last = last_real(tokens)                                              # (B,)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    return torch.softmax(move_logits[rows, last], dim=-1), dt[rows, last]


@graph("next_cell")
def next_cell(model: TrajectoryModel, tokens, dow, minute, cont, move):
    """The next vocabulary token instead of the next move (what models of pgtraj 0.1 were served with)."""
    h, _, dt = model.next_step(tokens, dow, minute, cont, move)
    last = last_real(tokens)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    return torch.softmax(model.lm_head(h[rows, last]), dim=-1), dt[rows, last]


@graph("token_nll")
def token_nll(model: TrajectoryModel, tokens, dow, minute, cont, move):
    """Per position, -log P(the move to the next cell) (0 where there is none)."""
    _, move_logits, _ = model.next_step(tokens, dow, minute, cont, move)
    logp = torch.log_softmax(move_logits[:, :-1], dim=-1)
    moves, has_move = move_targets({"tokens": tokens, "move": move})
    nll = -logp.gather(-1, moves.unsqueeze(-1)).squeeze(-1) * has_move.to(logp.dtype)
    return torch.cat([nll, torch.zeros_like(nll[:, :1])], dim=1)
