"""pgtraj: trajectory foundation models that live inside PostgreSQL.

The package is layered by where code runs (ARCHITECTURE.md): ``core`` (numpy + h3), ``learn`` (torch),
``db`` (the client's side of the database), ``runtime`` (what PL/Python imports inside the server) and
``app`` (the command line). This module stays import-light on purpose: the server imports
``pgtraj.runtime`` where neither torch nor psycopg is installed.
"""

import hashlib
from pathlib import Path

__version__ = "0.4.0"

PACKAGE_DIR = Path(__file__).resolve().parent


def package_digest() -> str:
    """sha256 over the package's source files: `pgtraj install` compares the client's with the server's,
    so the database never runs other code than the client it was installed from. (sql/ and migrations/ are
    checked by the migration ledger; assets/, the base model's release, stays on the client.)"""
    h = hashlib.sha256()
    for f in sorted(PACKAGE_DIR.rglob("*")):
        rel = f.relative_to(PACKAGE_DIR)
        if f.is_file() and "__pycache__" not in rel.parts and rel.parts[0] not in ("sql", "migrations", "assets"):
            h.update(str(rel).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()
