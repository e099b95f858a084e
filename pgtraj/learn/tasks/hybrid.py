"""Masked spans and contrastive learning together: the pretraining objective of the main job."""

from __future__ import annotations

import torch

from pgtraj.learn.model import TrajectoryModel
from pgtraj.learn.tasks import Objective, objective
from pgtraj.learn.tasks.contrastive import Contrastive
from pgtraj.learn.tasks.masked_spans import MaskedSpans


@objective
class Hybrid(Objective):
    """Weighted masked-span + contrastive loss, as surveyed in "Spatio-Temporal Trajectory Foundation Model"."""

    name = "hybrid"
    graphs = ("encoder", "masked_logp")  # what a model trained with it is registered with

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
