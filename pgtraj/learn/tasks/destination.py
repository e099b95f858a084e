"""Fine-tuning for destinations, and its graph: destination (the trip's likeliest last cells given the
trip so far, for pgtraj.predict_destination)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pgtraj.learn.model import TrajectoryModel
from pgtraj.learn.tasks import Objective, graph, last_real, objective


@objective
class Destination(Objective):
    """Fine-tuning: the trip's last cell from every prefix (causal). Windows end where the trip ends."""

    name = "destination"
    graphs = ("encoder", "destination")  # what a model trained with it is registered with
    tail_windows = True

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        tokens = batch["tokens"]
        logits = self.net(TrajectoryModel.destination_logits, *self.inputs(batch))
        last = last_real(tokens)
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


@graph("destination")
def destination(model: TrajectoryModel, tokens, dow, minute, cont, move):
    logits = model.destination_logits(tokens, dow, minute, cont, move)
    last = last_real(tokens)
    return torch.softmax(logits[torch.arange(tokens.shape[0], device=tokens.device), last], dim=-1)
