"""Contrastive learning of the similarity embedding (the encoder graph, learn.tasks.encoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pgtraj.learn.model import TrajectoryModel
from pgtraj.learn.tasks import Objective, objective


@objective
class Contrastive(Objective):
    """InfoNCE between two augmented views of the same trips (TrajCL-style): each view must find its twin
    among the batch."""

    name = "contrastive"
    graphs = ("encoder",)  # what a model trained with it is registered with

    def __init__(self, model: TrajectoryModel, temperature: float = 0.07):
        super().__init__(model)
        self.temperature = temperature

    def loss(self, views: tuple[dict, dict]) -> tuple[torch.Tensor, dict]:
        a, b = (self.net(TrajectoryModel.embed, *self.inputs(v)) for v in views)
        sim = a @ b.T / self.temperature
        target = torch.arange(len(a), device=a.device)
        loss = (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target)) / 2
        with torch.no_grad():
            acc = (sim.argmax(-1) == target).float().mean()
        return loss, {"nce": loss.item(), "twin_acc": acc.item()}
