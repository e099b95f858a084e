"""What every served task shares inside PostgreSQL (numpy + onnxruntime + h3): reading a trajectory as a
model may (checked, tokenized), cutting it into the model's windows, grouping sequences into ONNX calls,
running them, and writing cells and vectors out; and the rows of pgtraj.tokenize.

Nothing here queries the database: parallel workers may not run queries from PL/Python. Long loops serve
a pending cancel or statement_timeout as they go (server.check_interrupts). ``plpy`` is passed in by the
SQL wrappers (it exists only inside PL/Python); the benchmarks call the pure functions with None.
"""

from __future__ import annotations

import numpy as np

from pgtraj.core.errors import PgtrajError
from pgtraj.core.features import collate
from pgtraj.core.tokenizer import SPECIAL_TOKENS, Tokenizer
from pgtraj.core.trajectory import check_time_order, from_wkb
from pgtraj.runtime import models
from pgtraj.runtime.server import InferenceError, check_interrupts

# Padded tokens per ONNX call. On CPU, 256 to 1,024 run equally fast; larger ones pad more: 4,096 cost 20%
# more on 500 mixed GeoLife trips, a fixed 256 rows 2.4x the padding (benchmarks/sql_inference.py).
BATCH_TOKENS = 1024
BATCH_ROWS = 256


def read(tokenizer: Tokenizer, wkb, who=None, plpy=None):
    """One trajectory (parsed once) and its tokens. An unusable one raises InferenceError (SQLSTATE 22023)
    naming it (``who``: None, a row's key, or its place in an array) and the reason; so does any other
    failure on this input, whatever raised it, so that one bad row can always be set aside."""
    try:
        traj = check_time_order(from_wkb(who, wkb))
        return traj, tokenizer.encode(traj, check=lambda: check_interrupts(plpy))
    except PgtrajError as exc:
        raise InferenceError(exc.message, sqlstate="22023", hint=exc.hint) from None
    except (ArithmeticError, ValueError, TypeError, IndexError, KeyError, OSError) as exc:
        whom = "trajectory" if who is None else f"trajectory {who!r}"
        raise InferenceError(f"{whom} cannot be read: {type(exc).__name__}: {exc}", sqlstate="22023",
                             hint="check its coordinates and M values (epoch seconds)") from None


def encode(tokenizer: Tokenizer, wkb, plpy=None):
    """The tokens of one trajectory, as _read."""
    return read(tokenizer, wkb, None, plpy)[1]


def length_batches(lengths: list[int], max_tokens: int = BATCH_TOKENS, max_rows: int = BATCH_ROWS) -> list[list[int]]:
    """Indices grouped into ONNX calls of similar length: sorted, then cut where a batch padded to its longest
    member would pass ``max_tokens``. Many short sequences share a call; long ones do not drag short ones
    to their length."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > max_tokens or len(cur) == max_rows:
            out.append(cur)
            cur = []
        cur.append(i)
    return out + [cur] if cur else out


def run(session, seqs: list) -> list[np.ndarray]:
    """One ONNX call over padded sequences (features.Inputs), given the inputs the graph takes (all of
    INPUT_NAMES, or the first four for a graph of pgtraj 0.1) and as many continuous columns as it
    declares (graphs exported before altitude existed take eight)."""
    b = collate(seqs)
    feed = {}
    for i in session.get_inputs():
        feed[i.name] = getattr(b, i.name)
        if i.name == "cont" and isinstance(i.shape[-1], int):
            feed[i.name] = feed[i.name][..., : i.shape[-1]]
    return session.run(None, feed)


# below this share of a trip's cells known to the vocabulary at full resolution, predictions go by moves,
# time and motion alone, and say so
COVERAGE_NOTICE_BELOW = 0.5


def coverage(tokenizer: Tokenizer, x) -> dict:
    """How the vocabulary knows a tokenized trip: shares of its cells with a token of their own, with a
    coarser ancestor's token only, and unknown (UNK)."""
    n = max(len(x.tokens), 1)
    cell = x.tokens >= len(SPECIAL_TOKENS)
    exact = tokenizer.names_exactly(x.tokens, x.cells)
    return {"known": float(exact.sum()) / n, "coarse": float((cell & ~exact).sum()) / n,
            "unknown": float((~cell).sum()) / n}


def coverage_notice(plpy, model: models.Model, ref, x) -> None:
    """A NOTICE when the trip lies mostly outside what the model's vocabulary knows."""
    c = coverage(model.tokenizer, x)
    if plpy is not None and c["known"] < COVERAGE_NOTICE_BELOW:
        plpy.notice(f"pgtraj: {c['known']:.0%} of this trip's cells are in the vocabulary of"
                    f" {models.label(plpy, ref.model_id)} ({c['coarse']:.0%} only as a coarser cell, {c['unknown']:.0%} unknown):"
                    " its predictions rest on the moves, times and speeds of the trip",
                    hint="fine-tune the model on data from this area for predictions that know its places")


def windows(inp, max_len: int) -> list:
    """A sequence cut into consecutive windows of at most ``max_len`` (the model's context)."""
    n = len(inp.tokens)
    if n <= max_len:
        return [inp]
    return [inp.window(s, s + max_len) for s in range(0, n, max_len)]


def tail(inp, max_len: int):
    """The last ``max_len`` positions of a sequence: what a prediction from the trip so far reads."""
    return inp.window(max(len(inp.tokens) - max_len, 0), len(inp.tokens))


def vector_text(v: np.ndarray) -> str:
    """pgvector's text form; 9 significant digits round-trip float32 exactly."""
    return "[" + ",".join(format(float(x), ".9g") for x in v) + "]"


def cell_rows(model: models.Model, p: np.ndarray, order: np.ndarray, k: int) -> list[tuple]:
    """(rank, cell, lat, lon, probability) of the first ``k`` cell tokens of ``order``."""
    import h3

    rows = []
    for t in order:
        if len(rows) == k:
            break
        if t < len(SPECIAL_TOKENS):
            continue
        cell = h3.int_to_str(model.tokenizer.token_cell(int(t)))
        lat, lon = h3.cell_to_latlng(cell)
        rows.append((len(rows) + 1, cell, lat, lon, float(p[t])))
    return rows



def tokenize(plpy, wkb: bytes, tokenizer_json: str) -> list[tuple]:
    """Rows of ``pgtraj.tokenize()``: one per token, the same values the client's Tokenizer.encode gives,
    for trajectories that inference would accept."""
    import h3

    x = read(models.tokenizer(tokenizer_json), wkb, None, plpy)[1]
    return list(zip(range(1, len(x) + 1), x.tokens.tolist(), [h3.int_to_str(int(c)) for c in x.cells],
                    x.t.tolist(), x.dwell.tolist(), x.dt.tolist(), x.dow.tolist(), x.minute.tolist(),
                    x.offset[:, 0].tolist(), x.offset[:, 1].tolist(), x.speed.tolist(), x.heading.tolist(),
                    x.interpolated.tolist(), x.move.tolist()))
