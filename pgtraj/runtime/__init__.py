"""What PL/Python imports inside PostgreSQL. Depends on numpy, onnxruntime and h3 only, never torch or
psycopg: the SQL functions in sql/ are thin wrappers that call into this package."""

from __future__ import annotations

import sys

from .. import __version__

REQUIRED = ("numpy", "onnxruntime", "h3")


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
    }
