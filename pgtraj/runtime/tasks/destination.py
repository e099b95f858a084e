"""The destination graph: pgtraj.predict_destination, the likeliest last cells of a trip in progress."""

from __future__ import annotations

import numpy as np

from pgtraj.core.features import to_inputs
from pgtraj.runtime import models
from pgtraj.runtime.encoding import cell_rows, encode, run, tail
from pgtraj.runtime.models import Ref
from pgtraj.runtime.server import InferenceError


def predict_destination(plpy, wkb, ref: Ref, k: int) -> list[tuple]:
    """Rows (rank, cell, lat, lon, probability) of the ``k`` likeliest last cells of the trip."""
    if k < 1:
        raise InferenceError(f"k must be at least 1, not {k}", sqlstate="22023")
    model, sess = models.session(plpy, ref)
    x = encode(model.tokenizer, wkb, plpy)
    (probs,) = run(sess, [tail(to_inputs(x), model.max_len)])
    return cell_rows(model, probs[0], np.argsort(-probs[0], kind="stable"), k)
