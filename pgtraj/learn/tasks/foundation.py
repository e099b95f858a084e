"""The base model's pretraining: next moves (causal), masked spans (bidirectional) and the contrastive
route embedding at once, on one backbone, so that one pretrained model serves every graph a fine-tuned one
may need (encoder, next_move, token_nll, masked_logp)."""

from __future__ import annotations

import torch

from pgtraj.learn.model import TrajectoryModel
from pgtraj.learn.tasks import Objective, objective
from pgtraj.learn.tasks.contrastive import Contrastive
from pgtraj.learn.tasks.masked_spans import MaskedSpans
from pgtraj.learn.tasks.next_cell import NextCell


@objective
class Foundation(Objective):
    """Weighted next-move + masked-span + contrastive loss."""

    name = "foundation"
    graphs = ("encoder", "next_move", "token_nll", "masked_logp")  # what a model trained with it is registered with

    def __init__(self, model: TrajectoryModel, weights: tuple[float, float, float] = (1.0, 0.5, 0.5)):
        super().__init__(model)
        self.parts = (NextCell(model), MaskedSpans(model), Contrastive(model))
        self.weights = weights

    def use(self, net) -> None:
        super().use(net)
        for p in self.parts:
            p.use(net)

    def loss(self, batch_and_views: tuple[dict, tuple[dict, dict]]) -> tuple[torch.Tensor, dict]:
        batch, views = batch_and_views
        losses, metrics = [], {}
        for part, data in zip(self.parts, (batch, batch, views)):
            loss, m = part.loss(data)
            losses.append(loss)
            metrics.update(m)
        return sum(w * loss for w, loss in zip(self.weights, losses)), metrics
