"""The package's layers (ARCHITECTURE.md): what each folder may import, checked on the source, and what
importing the in-database runtime actually loads, checked in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pgtraj

PACKAGE = Path(pgtraj.__file__).parent
# what each layer may import from pgtraj (besides itself and the package root: version, digest)
ALLOWED = {
    "core": {"core"},
    "learn": {"core", "learn"},
    "runtime": {"core", "runtime"},
    "db": {"core", "db", "runtime.boot"},  # install writes the runtime's boot code into the functions it creates
    "app": {"core", "learn", "db", "runtime", "app"},
}
# the one documented way from the server into the torch side: CALL pgtraj.train, from a PL/Python environment
# built with --training, reaches learn through its pipeline, and only when it trains
EXCEPTIONS = {("runtime/training.py", "learn.pipeline")}


def pgtraj_imports(path: Path) -> list[tuple[str, bool]]:
    """(module under pgtraj, whether imported at module level) for each import of a pgtraj module."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            if name.startswith("pgtraj."):
                out.append((name[len("pgtraj."):], id(node) in top))
    return out


def test_every_import_points_down_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if len(rel.parts) < 2:
            continue  # the package root
        layer = rel.parts[0]
        for module, at_top in pgtraj_imports(path):
            ok = any(module == a or module.startswith(a + ".") for a in ALLOWED[layer])
            if not ok and (str(rel), ".".join(module.split(".")[:2])) in EXCEPTIONS and not at_top:
                ok = True
            if not ok:
                wrong.append(f"{rel} imports pgtraj.{module}")
    assert not wrong, "\n".join(wrong)


def test_the_runtime_loads_neither_torch_nor_the_client():
    """What PL/Python imports (runtime.api) pulls in no torch, no psycopg and nothing of learn, db or app."""
    code = ("import sys, pgtraj.runtime.api; print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in"
            " ('torch', 'psycopg', 'sqlalchemy') or m.startswith(('pgtraj.learn', 'pgtraj.db', 'pgtraj.app')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "", out


def test_core_needs_only_numpy_and_h3():
    code = ("import sys, pkgutil, importlib, pgtraj.core as c\n"
            "[importlib.import_module('pgtraj.core.' + m.name) for m in pkgutil.iter_modules(c.__path__)]\n"
            "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'psycopg', 'onnxruntime',"
            " 'sqlalchemy', 'pyarrow'})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "", out
