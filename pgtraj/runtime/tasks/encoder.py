"""The encoder: pgtraj.embed and pgtraj.similarity (in SQL over the vectors), embed_table and the refresh
queue. One unit-length vector per trajectory; a trip longer than the model's context is embedded window by
window and the windows' embeddings averaged."""

from __future__ import annotations

import numpy as np

from pgtraj.core.features import to_inputs
from pgtraj.core.tokenizer import Tokenizer
from pgtraj.runtime import models
from pgtraj.runtime.encoding import length_batches, read, run, vector_text, windows
from pgtraj.runtime.models import Ref
from pgtraj.runtime.server import InferenceError, check_interrupts


def embed_wkbs(tokenizer: Tokenizer, max_len: int, sess, wkbs: list, *, labels: list | None = None,
               skip_errors: bool = False, plpy=None) -> tuple[list, dict]:
    """Unit-length embeddings (float32; None for None) of trajectories given as WKB, and {index:
    InferenceError} of those skipped as unusable (with ``skip_errors``; otherwise the first raises).
    ``labels`` name the trajectories in messages (a row's key; by default their place, from 1).

    A trip longer than the model's context is embedded window by window and the windows' embeddings
    averaged, then normalised. Pure: what the database runs, and what benchmarks/ runs outside it."""
    owner, seqs, errors = [], [], {}
    for i, wkb in enumerate(wkbs):
        if wkb is None:
            continue
        try:
            x = read(tokenizer, wkb, labels[i] if labels else i + 1, plpy)[1]
        except InferenceError as exc:
            if not skip_errors:
                raise
            errors[i] = exc
            continue
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
    return out, errors


def embed_rows(plpy, wkbs: list, ref: Ref, *, labels: list | None = None,
               skip_errors: bool = False) -> tuple[list, dict]:
    """The embeddings (pgvector text; None for None) and the skipped rows, as embed_wkbs."""
    model, sess = models.session(plpy, ref)
    embs, errors = embed_wkbs(model.tokenizer, model.max_len, sess, wkbs, labels=labels, skip_errors=skip_errors,
                              plpy=plpy)
    return [None if e is None else vector_text(e) for e in embs], errors


def embed_many(plpy, wkbs: list, ref: Ref) -> list:
    """pgtraj.embed: one trajectory, or an array of them named by their place in it."""
    return embed_rows(plpy, wkbs, ref, labels=None if len(wkbs) > 1 else [None])[0]
