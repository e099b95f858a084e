"""Objectives and fine-tuning tasks, one module each, as thin wrappers around one TrajectoryModel (in the
x-transformers manner): a task's module holds its loss (an Objective, with the graphs a model trained with it
is registered with) and the forward pass of each graph kind it introduces, for ONNX export. What each kind
takes and gives is core.contract.GRAPHS; its in-database side is the module of the same name under
pgtraj/runtime/tasks/.

Objectives take batches from learn.batches.Batches and return (loss, metrics). Passes go through
``self.net`` (the model, or its DistributedDataParallel wrapper set with ``use``) by calling it with the
model method to run, so a wrapper sees and synchronises every pass; ``self.model`` is the bare model.
"""

from __future__ import annotations

import torch

from pgtraj.core.contract import INPUT_NAMES
from pgtraj.core.tokenizer import PAD
from pgtraj.learn.model import TrajectoryModel

OBJECTIVES: dict[str, type] = {}   # name -> Objective subclass
GRAPH_FORWARDS: dict[str, object] = {}  # graph kind -> forward(model, *inputs in INPUT_NAMES order)


def objective(cls):
    """Register an Objective subclass under its ``name``."""
    OBJECTIVES[cls.name] = cls
    return cls


def graph(kind: str):
    """Register the forward pass of graph ``kind`` (what learn.export traces)."""
    def register(fn):
        GRAPH_FORWARDS[kind] = fn
        return fn
    return register


class Objective:
    name = ""
    graphs: tuple[str, ...] = ("encoder",)
    tail_windows = False   # windows of long trips end at the trip's end (the target lives there)
    needs_labels = False   # batches carry a per-trajectory "label"

    def __init__(self, model: TrajectoryModel):
        self.model = self.net = model

    def use(self, net) -> None:
        """Run passes through ``net`` (e.g. DistributedDataParallel(model))."""
        self.net = net

    def inputs(self, batch: dict) -> tuple:
        return tuple(batch[k] for k in INPUT_NAMES)


def last_real(tokens: torch.Tensor) -> torch.Tensor:
    """Index of each sequence's last non-padding position (B,)."""
    return ((tokens != PAD).sum(1) - 1).clamp_min(0)


@graph("encoder")  # every model is registered with it: the similarity embedding
def encoder(model: TrajectoryModel, tokens, dow, minute, cont, move):
    return model.embed(tokens, dow, minute, cont, move)


def batch_for(objective, batches) -> object:
    """What an objective's loss() takes, drawn from a learn.batches.Batches."""
    from pgtraj.learn.tasks.contrastive import Contrastive
    from pgtraj.learn.tasks.foundation import Foundation
    from pgtraj.learn.tasks.hybrid import Hybrid

    if isinstance(objective, Contrastive):
        return batches.views()
    if isinstance(objective, (Hybrid, Foundation)):
        return batches.next(), batches.views()
    return batches.next()


# the task modules register themselves; imported last, as they import the names above
from pgtraj.learn.tasks import (  # noqa: E402,F401
    classify,
    contrastive,
    destination,
    foundation,
    hybrid,
    masked_spans,
    next_cell,
    travel_time,
)
