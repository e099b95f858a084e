"""What the PL/Python functions of pgtraj reach, as ``pgtraj`` in their bodies (the boot snippet binds this
module: runtime/boot.py): the modules they call, and how their errors are reported."""

from __future__ import annotations

import importlib.metadata
import sys

from pgtraj import __version__, package_digest
from pgtraj.core.errors import PgtrajError
from pgtraj.runtime import batch, encoding, graphs, models, queue, sources, training, transfer, trips  # noqa: F401
from pgtraj.runtime.server import sql_error  # noqa: F401  (used by every PL/Python body)
from pgtraj.runtime.tasks import (  # noqa: F401
    classify,
    destination,
    encoder,
    masked,
    next_move,
    token_nll,
    travel_time,
)

try:  # inside the server: SQL errors from queries the runtime ran, and errors raised while it sent a NOTICE
    import plpy

    REPORTED = (PgtrajError, plpy.Error, plpy.SPIError)
except ImportError:  # imported outside PostgreSQL (tests, benchmarks)
    REPORTED = (PgtrajError,)


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
        "tzfpy": importlib.metadata.version("tzfpy"),
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "torch_loaded": "torch" in sys.modules,
        "digest": package_digest(),
        "cache": {"models": len(models._models), "sessions": len(models._sessions), "loads": dict(models.loads)},
    }
