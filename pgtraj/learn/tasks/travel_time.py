"""Fine-tuning for travel time, and its graph: travel_time (seconds from a route's first cell to its last,
for pgtraj.predict_travel_time)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pgtraj.core.features import LOG_DT, LOG_TIME_SCALE
from pgtraj.core.tokenizer import PAD
from pgtraj.learn.model import TrajectoryModel
from pgtraj.learn.tasks import Objective, graph, objective


def elapsed_log1p(batch: dict) -> torch.Tensor:
    """log1p(seconds from the first to the last real position) of each sequence, from the dt feature."""
    dt = torch.expm1(batch["cont"][..., LOG_DT] * LOG_TIME_SCALE)
    real = batch["tokens"] != PAD
    real[:, :2] = False  # BOS, and the first cell's dt (time since a cell before the window)
    return torch.log1p((dt * real).sum(1))


@objective
class TravelTime(Objective):
    """Fine-tuning: travel-time estimation. The route (cells, offsets, headings) and the departure time are
    shown, every timing feature is hidden; the target is log1p(seconds from first to last cell)."""

    name = "travel_time"
    graphs = ("encoder", "travel_time")  # what a model trained with it is registered with

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        target = elapsed_log1p(batch)
        pred = self.net(TrajectoryModel.travel_time, *self.inputs(batch))
        loss = F.smooth_l1_loss(pred, target)
        with torch.no_grad():
            mae = (torch.expm1(pred) - torch.expm1(target)).abs().mean()
        return loss, {"tte_l1": loss.item(), "tte_mae_s": mae.item()}


@graph("travel_time")
def travel_time(model: TrajectoryModel, tokens, dow, minute, cont, move):
    return model.travel_time(tokens, dow, minute, cont, move)
