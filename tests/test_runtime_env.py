"""The in-database runtime stays torch-free and is what PL/Python actually imports."""

from __future__ import annotations

import subprocess

import psycopg

from pgtraj import package_digest

from .conftest import CACHE


def test_runtime_imports_without_torch_or_psycopg():
    # the PL/Python environment's own interpreter: it has neither torch nor psycopg installed, so a stray
    # import anywhere under pgtraj.runtime fails here exactly as it would inside the server
    python = CACHE / "runtime-venv" / "bin" / "python"
    code = ("import sys, pgtraj.runtime.api as r; info = r.info(); "
            "bad = [m for m in ('torch', 'psycopg') if m in sys.modules]; "
            "assert not bad, bad; print(info['pgtraj'])")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_server_copy_of_the_package_is_current(cluster, db):
    site = cluster.python_path
    assert (CACHE / "runtime-venv").exists()
    with open(f"{site}/.pgtraj-digest") as f:
        assert f.read() == package_digest()
    with psycopg.connect(db) as conn:
        info = conn.execute("SELECT pgtraj.runtime_info()").fetchone()[0]
    assert info["python"].startswith("3.11") and info["onnxruntime"] and info["h3"].startswith("4.")
