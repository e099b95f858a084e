"""The travel_time graph: pgtraj.predict_travel_time, how long a route takes from its first fix to its last,
given where it goes and when it leaves (the route's other times are not read)."""

from __future__ import annotations

import numpy as np

from pgtraj.core.features import to_inputs
from pgtraj.runtime import models
from pgtraj.runtime.encoding import encode, run
from pgtraj.runtime.models import Ref
from pgtraj.runtime.server import check_interrupts


def predict_travel_time(plpy, wkb, ref: Ref) -> float:
    """Seconds from the route's first cell to its last. A route longer than the model's context is cut
    into windows that share their boundary cell, each departing when the route does, and their times
    added up."""
    model, sess = models.session(plpy, ref)
    inp = to_inputs(encode(model.tokenizer, wkb, plpy))
    first = 1 if len(inp.tokens) > 1 else 0  # the first cell, after BOS
    inp.dow[:] = inp.dow[first]  # every window departs at the route's departure: no later time is read
    inp.minute[:] = inp.minute[first]
    n, step = len(inp.tokens), max(model.max_len - 1, 1)
    total = 0.0
    for start in range(0, max(n - 1, 1), step):
        check_interrupts(plpy)
        (log1p_seconds,) = run(sess, [inp.window(start, min(start + model.max_len, n))])
        total += float(np.expm1(log1p_seconds[0]))
    return total
