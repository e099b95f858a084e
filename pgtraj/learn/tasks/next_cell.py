"""GPT-style next-cell prediction, and its graphs: next_cell (the next cell and the time until it, for
pgtraj.predict_next and predict_path) and token_nll (each cell's surprise, for pgtraj.score)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pgtraj.core.features import LOG_DT, LOG_TIME_SCALE
from pgtraj.core.tokenizer import PAD
from pgtraj.learn.model import TrajectoryModel
from pgtraj.learn.tasks import Objective, graph, last_real, objective


@objective
class NextCell(Objective):
    """GPT-style: predict each next token (and log1p seconds until it) from the prefix."""

    name = "next_cell"
    graphs = ("encoder", "next_cell", "token_nll")  # what a model trained with it is registered with

    def __init__(self, model: TrajectoryModel, time_weight: float = 0.1):
        super().__init__(model)
        self.time_weight = time_weight

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        logits, dt_pred = self.net(TrajectoryModel.next_logits, *self.inputs(batch))
        target = batch["tokens"][:, 1:]
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=PAD)
        real = target != PAD
        # the next position's log1p(dt) feature: the time it takes to get there
        dt_target = batch["cont"][:, 1:, LOG_DT] * LOG_TIME_SCALE
        time_loss = F.smooth_l1_loss(dt_pred[:, :-1][real], dt_target[real])
        with torch.no_grad():
            acc = (logits[:, :-1].argmax(-1) == target)[real].float().mean()
        return ce + self.time_weight * time_loss, {"ce": ce.item(), "time_l1": time_loss.item(), "acc@1": acc.item()}


@graph("next_cell")
def next_cell(model: TrajectoryModel, tokens, dow, minute, cont):
    logits, dt = model.next_logits(tokens, dow, minute, cont)
    last = last_real(tokens)                                              # (B,)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    return torch.softmax(logits[rows, last], dim=-1), dt[rows, last]


@graph("token_nll")
def token_nll(model: TrajectoryModel, tokens, dow, minute, cont):
    logits, _ = model.next_logits(tokens, dow, minute, cont)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nxt = tokens[:, 1:]
    nll = -logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1) * (nxt != PAD).to(logp.dtype)
    return torch.cat([nll, torch.zeros_like(nll[:, :1])], dim=1)
