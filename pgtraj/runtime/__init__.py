"""What PL/Python imports inside PostgreSQL. Depends on numpy, onnxruntime and h3 only, never torch or
psycopg: the SQL functions in sql/ are thin wrappers that call into this package, each body run under a
handler (install.plpython_body) that reports the errors in REPORTED through sql_error."""

from __future__ import annotations

import hashlib
import sys
from collections import OrderedDict
from pathlib import Path

from .. import __version__
from ..errors import PgtrajError
from ..tokenizer import Tokenizer
from . import batch, graphs, inference, models, queue, training, transfer  # noqa: F401  (what the SQL bodies call)
from .server import sql_error  # noqa: F401  (used by every PL/Python body)

try:  # inside the server: SQL errors from queries the runtime ran, and errors raised while it sent a NOTICE
    import plpy

    REPORTED = (PgtrajError, plpy.Error, plpy.SPIError)
except ImportError:  # imported outside PostgreSQL (tests, benchmarks)
    REPORTED = (PgtrajError,)

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def package_digest() -> str:
    """sha256 over the pgtraj package's source files: `pgtraj install` compares the client's with the
    server's, so the database never runs other code than the client it was installed from."""
    h = hashlib.sha256()
    for f in sorted(PACKAGE_DIR.rglob("*")):
        rel = f.relative_to(PACKAGE_DIR)
        if f.is_file() and "__pycache__" not in rel.parts and rel.parts[0] not in ("sql", "migrations"):
            h.update(str(rel).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def info() -> dict:
    """Versions of everything the in-database runtime depends on (``pgtraj.runtime_info()`` in SQL)."""
    import h3
    import numpy
    import onnxruntime

    return {
        "pgtraj": __version__,
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "onnxruntime": onnxruntime.__version__,
        "h3": h3.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "torch_loaded": "torch" in sys.modules,
        "digest": package_digest(),
        "cache": {"models": len(models._models), "sessions": len(models._sessions), "loads": dict(models.loads)},
    }


# Tokenizers parsed in this backend (least recently used dropped first), keyed by the sha256 of their
# JSON: parsing a large vocabulary per call would dominate the cost of tokenizing one trajectory.
_tokenizers: OrderedDict[str, Tokenizer] = OrderedDict()


def tokenizer_from_json(text: str) -> Tokenizer:
    key = hashlib.sha256(text.encode()).hexdigest()
    tok = _tokenizers.get(key)
    if tok is None:
        if len(_tokenizers) >= 16:
            _tokenizers.popitem(last=False)
        tok = _tokenizers[key] = Tokenizer.from_json(text)
    _tokenizers.move_to_end(key)
    return tok


def tokenize(plpy, wkb: bytes, tokenizer_json: str) -> list[tuple]:
    """Rows of ``pgtraj.tokenize()``: one per token, the same values the client's Tokenizer.encode gives,
    for trajectories that inference would accept."""
    import h3

    x = inference._read(tokenizer_from_json(tokenizer_json), wkb, None, plpy)[1]
    return list(zip(range(1, len(x) + 1), x.tokens.tolist(), [h3.int_to_str(int(c)) for c in x.cells],
                    x.t.tolist(), x.dwell.tolist(), x.dt.tolist(), x.dow.tolist(), x.minute.tolist(),
                    x.offset[:, 0].tolist(), x.offset[:, 1].tolist(), x.speed.tolist(), x.heading.tolist(),
                    x.interpolated.tolist()))
