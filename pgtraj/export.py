"""ONNX export of a TrajectoryModel: the graphs the database runs through onnxruntime (no torch there).

* ``encoder``: (tokens, dow, minute, cont) -> embedding (B, d), L2-normalised;
* ``next_cell``: the same inputs -> probabilities of the next token after each sequence's last real position
  (B, V) and the predicted log1p(seconds) until it (B,);
* ``token_nll``: -log p(each next token | its prefix) (B, T), 0 where there is no next token (the
  per-position surprise behind anomaly scores);
* ``destination``: probabilities of the trip's last cell given the sequence so far (B, V);
* ``travel_time``: log1p(seconds from the first to the last cell) of a route (B,), timing inputs ignored;
* ``classify``: class probabilities (B, n_classes), for models fine-tuned with labels;
* ``masked``: for every position, the likeliest cell token and its probability (B, T) each, reading MASK
  tokens bidirectionally (the spatial features of masked positions must be zeroed, as in training): what
  gap filling runs, for models pretrained with masked spans.
Inputs are right-padded with PAD; batch and length are dynamic.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn as nn

from .data import to_tensors
from .features import collate, to_inputs
from .model import TrajectoryModel
from .tokenizer import PAD, SPECIAL_TOKENS, Tokenizer

N_SPECIAL = len(SPECIAL_TOKENS)

INPUT_NAMES = ["tokens", "dow", "minute", "cont"]
_DYNAMIC = {name: {0: "batch", 1: "length"} for name in INPUT_NAMES}
_OUTPUT_AXES = {name: {0: "batch", 1: "length"} for name in ("nll", "token", "probability")}  # per position; every other output is per sequence


class _Encoder(nn.Module):
    def __init__(self, model: TrajectoryModel):
        super().__init__()
        self.model = model

    def forward(self, tokens, dow, minute, cont):
        return self.model.embed(tokens, dow, minute, cont)


class _NextCell(nn.Module):
    def __init__(self, model: TrajectoryModel):
        super().__init__()
        self.model = model

    def forward(self, tokens, dow, minute, cont):
        logits, dt = self.model.next_logits(tokens, dow, minute, cont)
        last = ((tokens != PAD).sum(1) - 1).clamp_min(0)                     # (B,)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return torch.softmax(logits[rows, last], dim=-1), dt[rows, last]


class _TokenNll(nn.Module):
    def __init__(self, model: TrajectoryModel):
        super().__init__()
        self.model = model

    def forward(self, tokens, dow, minute, cont):
        logits, _ = self.model.next_logits(tokens, dow, minute, cont)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nxt = tokens[:, 1:]
        nll = -logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1) * (nxt != PAD).to(logp.dtype)
        return torch.cat([nll, torch.zeros_like(nll[:, :1])], dim=1)


class _Destination(nn.Module):
    def __init__(self, model: TrajectoryModel):
        super().__init__()
        self.model = model

    def forward(self, tokens, dow, minute, cont):
        logits = self.model.destination_logits(tokens, dow, minute, cont)
        last = ((tokens != PAD).sum(1) - 1).clamp_min(0)
        return torch.softmax(logits[torch.arange(tokens.shape[0], device=tokens.device), last], dim=-1)


class _TravelTime(nn.Module):
    def __init__(self, model: TrajectoryModel):
        super().__init__()
        self.model = model

    def forward(self, tokens, dow, minute, cont):
        return self.model.travel_time(tokens, dow, minute, cont)


class _Classify(nn.Module):
    def __init__(self, model: TrajectoryModel):
        super().__init__()
        self.model = model

    def forward(self, tokens, dow, minute, cont):
        return torch.softmax(self.model.classify(tokens, dow, minute, cont), dim=-1)


class _Masked(nn.Module):
    def __init__(self, model: TrajectoryModel):
        super().__init__()
        self.model = model

    def forward(self, tokens, dow, minute, cont):
        logits = self.model.lm_head(self.model.backbone(tokens, dow, minute, cont, causal=False))
        special = torch.arange(logits.shape[-1], device=logits.device) < N_SPECIAL
        probs = torch.softmax(logits, dim=-1).masked_fill(special, 0.0)  # a gap is filled with a place
        best, token = probs.max(dim=-1)
        return token, best


GRAPHS = {"encoder": (_Encoder, ["embedding"]), "next_cell": (_NextCell, ["probs", "log1p_dt"]),
          "token_nll": (_TokenNll, ["nll"]),
          "destination": (_Destination, ["probs"]), "travel_time": (_TravelTime, ["log1p_seconds"]),
          "classify": (_Classify, ["probs"]), "masked": (_Masked, ["token", "probability"])}

# the graphs registered after training with each objective (the encoder always; the task's own head)
GRAPHS_FOR = {"destination": ("encoder", "destination"), "travel_time": ("encoder", "travel_time"),
              "classify": ("encoder", "classify"), "hybrid": ("encoder", "masked"),
              "masked_spans": ("encoder", "masked"), "contrastive": ("encoder",)}
DEFAULT_GRAPHS = ("encoder", "next_cell", "token_nll")


def export(model: TrajectoryModel, kind: str, example: dict[str, torch.Tensor]) -> bytes:
    """ONNX bytes of one graph of ``model`` (opset 17, dynamic batch and length)."""
    wrapper_cls, outputs = GRAPHS[kind]
    wrapper = wrapper_cls(model).eval()
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # the exporter warns that advanced indexing breaks on negative indices; ours (token ids, ancestor
        # rows, last positions) are never negative
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(wrapper, tuple(example[n] for n in INPUT_NAMES), buf, input_names=INPUT_NAMES,
                          output_names=outputs,
                          dynamic_axes={**_DYNAMIC, **{o: _OUTPUT_AXES.get(o, {0: "batch"}) for o in outputs}},
                          opset_version=17, dynamo=False)
    return buf.getvalue()


def example_batch(tokenizer: Tokenizer, pieces: list, max_len: int) -> dict[str, torch.Tensor]:
    """What an export traces and checks parity on: the first four trajectories, tokenized and padded."""
    return to_tensors(collate([to_inputs(tokenizer.encode(t)) for t in pieces[:4]], max_len=max_len))


def export_checked(model: TrajectoryModel, objective: str, example: dict[str, torch.Tensor],
                   tolerance: float = 1e-3) -> tuple[dict[str, bytes], dict[str, float]]:
    """The graphs a model trained with ``objective`` is registered with, and each one's parity figure;
    raises ValueError when onnxruntime disagrees with torch beyond ``tolerance`` (that is a bug)."""
    artifacts, parity = {}, {}
    for kind in GRAPHS_FOR.get(objective, DEFAULT_GRAPHS):
        artifacts[kind] = export(model, kind, example)
        parity[kind] = max_abs_diff(model, kind, artifacts[kind], example)
        if parity[kind] > tolerance:
            raise ValueError(f"ONNX {kind} differs from torch by {parity[kind]:.2e}")
    return artifacts, parity


def torch_outputs(model: TrajectoryModel, kind: str, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
    wrapper = GRAPHS[kind][0](model).eval()
    with torch.no_grad():
        out = wrapper(*(batch[n] for n in INPUT_NAMES))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def max_abs_diff(model: TrajectoryModel, kind: str, onnx_bytes: bytes, batch: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between torch and onnxruntime on ``batch`` (the parity figure)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: batch[n].numpy() for n in INPUT_NAMES})
    want = torch_outputs(model, kind, batch)
    return max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
