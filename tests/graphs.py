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
