"""Fine-tuning with one label per trajectory (transport mode, user), and its graph: classify (class
probabilities, for pgtraj.classify)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pgtraj.learn.model import TrajectoryModel
from pgtraj.learn.tasks import Objective, graph, objective


@objective
class Classify(Objective):
    """Fine-tuning: one label per trajectory (transport mode, user for trajectory-user linking)."""

    name = "classify"
    graphs = ("encoder", "classify")  # what a model trained with it is registered with
    needs_labels = True

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = self.net(TrajectoryModel.classify, *self.inputs(batch))
        ce = F.cross_entropy(logits, batch["label"])
        with torch.no_grad():
            acc = (logits.argmax(-1) == batch["label"]).float().mean()
        return ce, {"cls_ce": ce.item(), "cls_acc": acc.item()}


@graph("classify")
def classify(model: TrajectoryModel, tokens, dow, minute, cont, move):
    return torch.softmax(model.classify(tokens, dow, minute, cont, move), dim=-1)
