"""Fit → export: the one way a model is made for the registry, whoever reads its data and registers it
(the client, app/training.py, through psycopg; CALL pgtraj.train, runtime/training.py, through SPI). Both
then store it with pgtraj._register, with the arguments Trained.registration() gives.

This module is the documented entry into the torch side from the database: runtime/training.py imports it
(TrainConfig, fit_and_export; nothing else of pgtraj.learn) when it trains.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pgtraj.learn.export import example_batch, export_checked, weights_npz
from pgtraj.learn.pretrained import AUTO, Pretrained, auto_start
from pgtraj.learn.train import TrainConfig, TrainingError, TrainResult, train

__all__ = ["AUTO", "Pretrained", "TrainConfig", "Trained", "auto_start", "fit_and_export"]


@dataclass
class Trained:
    result: TrainResult
    graphs: dict[str, bytes]   # kind -> ONNX bytes, the graphs of its objective (Objective.graphs), and
                               # 'weights' -> its weights (learn.export.weights_npz), for fine-tuning
    metrics: dict              # training metrics, with each graph's ONNX-vs-torch parity

    def registration(self, label_column: str | None = None) -> dict:
        """The keyword arguments of db.registry.register (pgtraj._register) for this model."""
        r = self.result
        return dict(objective=r.config.objective, tokenizer=json.loads(r.tokenizer.to_json()), artifacts=self.graphs,
                    config={"train": asdict(r.config), "model": r.model_config.to_dict(), "classes": r.classes,
                            "label_column": label_column},
                    metrics=self.metrics, primary_metric="val_loss", higher_is_better=False,
                    embedding_dim=r.model_config.d_model)


def fit_and_export(train_pieces: list, val_pieces: list, cfg: TrainConfig, out_dir: str | Path, *,
                   labels: dict | None = None, progress: bool = True, log=print, on_step=None,
                   init: Pretrained | None = None) -> Trained:
    """Train on cleaned pieces (learn.train.train: tokenizer, model, checkpoints), then export the graphs
    its objective registers, each checked against torch on validation data. ``init``: a registered model
    to fine-tune from (Pretrained.registered), when ``cfg.init_from`` names one."""
    result = train(train_pieces, val_pieces, cfg, out_dir, labels=labels, progress=progress, log=log,
                   on_step=on_step, init=init)
    example = example_batch(result.tokenizer, val_pieces, cfg.max_len)
    try:
        graphs, parity = export_checked(result.model, cfg.objective, example)
    except ValueError as exc:
        raise TrainingError(str(exc), hint="this is a bug") from None
    return Trained(result, {**graphs, "weights": weights_npz(result.model)},
                   {**result.metrics, "onnx_max_abs_diff": parity})
