"""The classify graph: pgtraj.classify, the likeliest labels of a trajectory (transport mode, user, ...)
among the classes the model was fine-tuned on."""

from __future__ import annotations

import numpy as np

from pgtraj.core.features import to_inputs
from pgtraj.runtime import models
from pgtraj.runtime.encoding import encode, run, windows
from pgtraj.runtime.models import Ref
from pgtraj.runtime.server import InferenceError, check_interrupts


def classify(plpy, wkb, ref: Ref, k: int) -> list[tuple]:
    """Rows (rank, label, probability) of the ``k`` likeliest classes; a trip longer than the model's
    context is read window by window and the windows' probabilities averaged."""
    if k < 1:
        raise InferenceError(f"k must be at least 1, not {k}", sqlstate="22023")
    model, sess = models.session(plpy, ref)
    if not model.classes:
        raise InferenceError(f"{models.label(plpy, ref.model_id)} has a classify graph but no class labels",
                             sqlstate="55000", hint="register it with config {\"classes\": [...]}")
    x = encode(model.tokenizer, wkb, plpy)
    probs = []
    for w in windows(to_inputs(x), model.max_len):
        check_interrupts(plpy)
        probs.append(run(sess, [w])[0][0])
    p = np.mean(probs, axis=0)
    order = np.argsort(-p, kind="stable")[:k]
    return [(rank + 1, str(model.classes[i]), float(p[i])) for rank, i in enumerate(order)]
