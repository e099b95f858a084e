"""ONNX export of a TrajectoryModel: the graphs the database runs through onnxruntime (no torch there).

What each graph kind takes and gives is core.contract.GRAPHS; its forward pass lives with its task
(learn/tasks/), as is which graphs a model trained with each objective is registered with. Inputs are
right-padded with PAD; batch and length are dynamic (opset 17).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn as nn

from pgtraj.core.contract import GRAPHS, INPUT_NAMES
from pgtraj.core.features import collate, to_inputs
from pgtraj.core.tokenizer import Tokenizer
from pgtraj.learn.batches import to_tensors
from pgtraj.learn.model import TrajectoryModel
from pgtraj.learn.tasks import GRAPH_FORWARDS, OBJECTIVES

_DYNAMIC = {name: {0: "batch", 1: "length"} for name in INPUT_NAMES}


class _Graph(nn.Module):
    """A model with one graph's forward pass (learn.tasks.GRAPH_FORWARDS) as its forward."""

    def __init__(self, model: TrajectoryModel, kind: str):
        super().__init__()
        self.model, self.run = model, GRAPH_FORWARDS[kind]

    def forward(self, *inputs):
        return self.run(self.model, *inputs)


def export(model: TrajectoryModel, kind: str, example: dict[str, torch.Tensor]) -> bytes:
    """ONNX bytes of one graph of ``model`` (opset 17, dynamic batch and length)."""
    outputs = GRAPHS[kind].outputs
    wrapper = _Graph(model, kind).eval()
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # the exporter warns that advanced indexing breaks on negative indices; ours (token ids, ancestor
        # rows, last positions) are never negative
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(wrapper, tuple(example[n] for n in INPUT_NAMES), buf, input_names=list(INPUT_NAMES),
                          output_names=[o.name for o in outputs],
                          dynamic_axes={**_DYNAMIC, **{o.name: {0: "batch", 1: "length"} if o.per_position
                                                       else {0: "batch"} for o in outputs}},
                          opset_version=17, dynamo=False)
    return buf.getvalue()


def weights_npz(model: TrajectoryModel, *, half: bool = False) -> bytes:
    """The model's weights as a numpy .npz archive (the registry's 'weights' artifact, what fine-tuning from
    a registered model starts from: learn.pretrained); tied weights are stored once. ``half``: floats as
    float16, compressed (the shipped base model's release)."""
    seen, arrays = set(), {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        a = t.detach().cpu().numpy()
        arrays[name] = a.astype(np.float16) if half and a.dtype == np.float32 else a
    buf = io.BytesIO()
    (np.savez_compressed if half else np.savez)(buf, **arrays)
    return buf.getvalue()


def weights_state(data: bytes) -> dict[str, torch.Tensor]:
    """A state dict from weights_npz bytes (float16 read back as float32; pickles refused), with the tied
    output embedding restored."""
    state = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        for k in arrays.files:
            a = arrays[k]  # each access reads the member again
            state[k] = torch.from_numpy(a.astype(np.float32) if a.dtype == np.float16 else a)
    if "backbone.tok.weight" in state:
        state.setdefault("lm_head.weight", state["backbone.tok.weight"])
    return state


def example_batch(tokenizer: Tokenizer, pieces: list, max_len: int) -> dict[str, torch.Tensor]:
    """What an export traces and checks parity on: the first four trajectories, tokenized and padded."""
    return to_tensors(collate([to_inputs(tokenizer.encode(t)) for t in pieces[:4]], max_len=max_len))


def export_checked(model: TrajectoryModel, objective: str, example: dict[str, torch.Tensor],
                   tolerance: float = 1e-3) -> tuple[dict[str, bytes], dict[str, float]]:
    """The graphs a model trained with ``objective`` is registered with, and each one's parity figure;
    raises ValueError when onnxruntime disagrees with torch beyond ``tolerance`` (that is a bug)."""
    artifacts, parity = {}, {}
    for kind in OBJECTIVES[objective].graphs:
        artifacts[kind] = export(model, kind, example)
        parity[kind] = max_abs_diff(model, kind, artifacts[kind], example)
        if parity[kind] > tolerance:
            raise ValueError(f"ONNX {kind} differs from torch by {parity[kind]:.2e}")
    return artifacts, parity


def torch_outputs(model: TrajectoryModel, kind: str, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
    wrapper = _Graph(model, kind).eval()
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


def onnx_embedder(model: TrajectoryModel, tokenizer: Tokenizer, example: list, *, batch_size: int = 64,
                  max_len: int = 512):
    """A function trajectories -> embeddings (N, d) through the model's encoder exported to ONNX (traced on
    ``example`` trajectories) and run by onnxruntime, as the database runs it."""
    import onnxruntime as ort

    sess = ort.InferenceSession(export(model, "encoder", example_batch(tokenizer, example, max_len)),
                                providers=["CPUExecutionProvider"])

    def embed(trajs: list) -> np.ndarray:
        out = []
        for i in range(0, len(trajs), batch_size):
            b = collate([to_inputs(tokenizer.encode(t)) for t in trajs[i:i + batch_size]], max_len=max_len)
            out.append(sess.run(None, {n: getattr(b, n) for n in INPUT_NAMES})[0])
        return np.concatenate(out)

    return embed
