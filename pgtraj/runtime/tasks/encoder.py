"""The encoder: pgtraj.embed and pgtraj.similarity (in SQL over the vectors), embed_table and the refresh
queue. One unit-length vector per trajectory; a trip longer than the model's context is embedded window by
window and the windows' embeddings averaged. Of its route, or of its route and its time (core.aspects)."""

from __future__ import annotations

import numpy as np

from pgtraj.core.aspects import ASPECTS, spacetime
from pgtraj.core.features import to_inputs
from pgtraj.core.tokenizer import Tokenizer
from pgtraj.runtime import models
from pgtraj.runtime.encoding import length_batches, read, run, vector_text, windows
from pgtraj.runtime.models import Ref
from pgtraj.runtime.server import InferenceError, check_interrupts


def check_aspect(aspect: str) -> str:
    if aspect not in ASPECTS:
        raise InferenceError(f"aspect must be one of {', '.join(ASPECTS)}, not {aspect!r}", sqlstate="22023",
                             hint="'route': where a trip goes, any day; 'spacetime': where and when")
    return aspect


def embed_wkbs(tokenizer: Tokenizer, max_len: int, sess, wkbs: list, *, labels: list | None = None,
               skip_errors: bool = False, plpy=None, aspect: str = "route") -> tuple[list, dict]:
    """Unit-length embeddings (float32; None for None) of trajectories given as WKB, and {index:
    InferenceError} of those skipped as unusable (with ``skip_errors``; otherwise the first raises).
    ``labels`` name the trajectories in messages (a row's key; by default their place, from 1).

    A trip longer than the model's context is embedded window by window and the windows' embeddings
    averaged, then normalised; a spacetime vector appends the code of its first and last fix times.
    Pure: what the database runs, and what benchmarks/ runs outside it."""
    check_aspect(aspect)
    owner, seqs, errors, span = [], [], {}, {}
    for i, wkb in enumerate(wkbs):
        if wkb is None:
            continue
        try:
            traj, x = read(tokenizer, wkb, labels[i] if labels else i + 1, plpy)
        except InferenceError as exc:
            if not skip_errors:
                raise
            errors[i] = exc
            continue
        span[i] = (traj.t[0], traj.t[-1])
        for w in windows(to_inputs(x), max_len):
            owner.append(i)
            seqs.append(w)
    sums: dict[int, np.ndarray] = {}
    for idx in length_batches([len(s.tokens) for s in seqs]):
        check_interrupts(plpy)
        (emb,) = run(sess, [seqs[j] for j in idx])
        for j, e in zip(idx, emb):
            sums[owner[j]] = sums.get(owner[j], 0.0) + e.astype(np.float64)
    out = [(sums[i] / max(np.linalg.norm(sums[i]), 1e-12)).astype(np.float32) if i in sums else None
           for i in range(len(wkbs))]
    if aspect == "spacetime":
        out = [None if v is None else spacetime(v[None], [span[i][0]], [span[i][1]])[0] for i, v in enumerate(out)]
    return out, errors


def embed_rows(plpy, wkbs: list, ref: Ref, *, labels: list | None = None, skip_errors: bool = False,
               aspect: str = "route") -> tuple[list, dict]:
    """The embeddings (pgvector text; None for None) and the skipped rows, as embed_wkbs."""
    model, sess = models.session(plpy, ref)
    embs, errors = embed_wkbs(model.tokenizer, model.max_len, sess, wkbs, labels=labels, skip_errors=skip_errors,
                              plpy=plpy, aspect=aspect)
    return [None if e is None else vector_text(e) for e in embs], errors


def embed_many(plpy, wkbs: list, ref: Ref, aspect: str = "route") -> list:
    """pgtraj.embed: one trajectory, or an array of them named by their place in it."""
    return embed_rows(plpy, wkbs, ref, labels=None if len(wkbs) > 1 else [None], aspect=aspect)[0]
