"""The token_nll graph: pgtraj.score, a trajectory's mean surprise (anomaly score)."""

from __future__ import annotations

from pgtraj.core.features import to_inputs
from pgtraj.core.tokenizer import JUMP
from pgtraj.runtime import models
from pgtraj.runtime.encoding import encode, run, windows
from pgtraj.runtime.models import Ref
from pgtraj.runtime.server import InferenceError, check_interrupts


def score(plpy, wkb, ref: Ref) -> float:
    """Mean surprise, -log p(next move | the trip so far), over the trip's moves (nats per move; a model of
    pgtraj 0.1: -log p(next cell), per cell): high for trips unlike anything the model learnt (anomaly
    detection). Long trips are scored window by window, each window read from its own start."""
    model, sess = models.session(plpy, ref)
    x = encode(model.tokenizer, wkb, plpy)
    if len(x.tokens) < 2:
        raise InferenceError("trajectory: too short to score (one cell, nothing to predict)", sqlstate="22023",
                             hint="score trips that cross at least two H3 cells")
    total, count = 0.0, 0
    for w in windows(to_inputs(x), model.max_len):
        check_interrupts(plpy)
        if len(w.tokens) < 2:
            continue
        (nll,) = run(sess, [w])
        total += float(nll[0, : len(w.tokens) - 1].sum())
        legacy = len(sess.get_inputs()) < 5  # a pgtraj 0.1 graph scores every next cell, the first one too
        count += len(w.tokens) - 1 if legacy else int((w.move[1:] <= JUMP).sum())
    return total / max(count, 1)
