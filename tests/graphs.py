"""Small real ONNX graphs for tests that need a registrable model version but not a trained one: the
registry stores only graphs that onnxruntime loads and that fit their kind."""

from __future__ import annotations

import functools
import json

from pgtraj.learn.export import export

from .test_model import TOK, TRIPS, batch, make_model

TOKENIZER = json.loads(TOK.to_json())


@functools.cache
def _encoder() -> bytes:
    return export(make_model(seed=0).eval(), "encoder", batch(TRIPS[:2]))


def encoder(tag: str = "") -> bytes:
    """The tiny model's encoder graph; a tag makes the bytes (and their sha256) distinct without changing
    the graph: it is appended as the model's doc_string, a protobuf field read last-wins."""
    data = _encoder()
    if tag:
        raw = tag.encode()
        data += bytes([0x32, len(raw)]) + raw  # field 6 (doc_string), length-delimited; tags stay < 128 bytes
    return data


@functools.cache
def legacy(kind: str) -> bytes:
    """A graph as pgtraj 0.1 exported them: the four inputs before moves (tokens, dow, minute, cont)."""
    import io

    import torch

    from pgtraj.core.contract import GRAPHS, LEGACY_INPUT_NAMES
    from pgtraj.core.features import NO_MOVE
    from pgtraj.learn.tasks import GRAPH_FORWARDS

    class Legacy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = make_model(seed=0).eval()
            self.run = vocab_nll if kind == "token_nll" else GRAPH_FORWARDS[kind]

        def forward(self, tokens, dow, minute, cont):
            return self.run(self.model, tokens, dow, minute, cont, torch.full_like(tokens, NO_MOVE))

    def vocab_nll(model, tokens, dow, minute, cont, move):  # 0.1's token_nll: -log p(next cell), every cell
        logp = torch.log_softmax(model.lm_head(model.next_step(tokens, dow, minute, cont, move)[0][:, :-1]), -1)
        nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1) * (tokens[:, 1:] != 0).to(logp.dtype)
        return torch.cat([nll, torch.zeros_like(nll[:, :1])], dim=1)

    b, buf = batch(TRIPS[:2]), io.BytesIO()
    outputs = [o.name for o in GRAPHS[kind].outputs]
    axes = {**{n: {0: "batch", 1: "length"} for n in LEGACY_INPUT_NAMES},
            **{o.name: {0: "batch", 1: "length"} if o.per_position else {0: "batch"} for o in GRAPHS[kind].outputs}}
    with torch.no_grad():
        torch.onnx.export(Legacy().eval(), tuple(b[n] for n in LEGACY_INPUT_NAMES), buf, input_names=list(LEGACY_INPUT_NAMES),
                          output_names=outputs, dynamic_axes=axes, opset_version=17, dynamo=False)
    return buf.getvalue()
