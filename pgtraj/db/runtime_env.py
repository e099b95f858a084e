"""The Python environment PL/Python imports inside PostgreSQL.

plpython3u embeds the system's libpython (Debian 12: 3.11.2), so the environment must be a venv made
with the *system* interpreter; a pyenv/conda interpreter of another patch level or ABI would load
C extensions (numpy, onnxruntime) that crash or refuse to import in the server. The venv gets the
pinned runtime requirements plus a copy of the ``pgtraj`` package, refreshed whenever it changes.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

from pgtraj import PACKAGE_DIR, package_digest
from pgtraj.core.errors import DatabaseSetupError

SYSTEM_PYTHON = os.environ.get("PGTRAJ_SYSTEM_PYTHON", "/usr/bin/python3")
REQUIREMENTS = PACKAGE_DIR / "runtime" / "requirements.txt"
TRAINING_REQUIREMENTS = PACKAGE_DIR / "runtime" / "requirements-train.txt"
# what the server never needs: SQL/migrations are applied by the client, caches are rebuilt
_NOT_COPIED = shutil.ignore_patterns("__pycache__", "*.pyc", "sql", "migrations", "assets")


def ensure_runtime_env(venv: Path, *, training: bool = False, log=print) -> Path:
    """Create or refresh the venv at ``venv``; return its site-packages directory. Idempotent and quick
    when nothing changed (stamp files are compared); safe to call from concurrent processes. ``training``
    adds torch and what training needs (requirements-train.txt), for pgtraj.train inside the database."""
    venv = Path(venv).absolute()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two `pgtraj db start` or test workers at once
        python = venv / "bin" / "python"
        if not python.exists():
            if not Path(SYSTEM_PYTHON).exists():
                raise DatabaseSetupError(
                    f"the system Python {SYSTEM_PYTHON} that PL/Python embeds is missing",
                    hint="run docker/install-debian.sh, or set PGTRAJ_SYSTEM_PYTHON",
                )
            log(f"creating the PL/Python environment {venv} with {SYSTEM_PYTHON}")
            _run([SYSTEM_PYTHON, "-m", "venv", str(venv)], "python3 -m venv (is python3-venv installed?)")
        wanted = REQUIREMENTS.read_text()
        stamp = venv / ".pgtraj-requirements"
        if not stamp.exists() or stamp.read_text() != wanted:
            log("installing numpy, onnxruntime and h3 into the PL/Python environment")
            _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(REQUIREMENTS)],
                 "pip install of the runtime requirements")
            stamp.write_text(wanted)
        if training:
            wanted = TRAINING_REQUIREMENTS.read_text() + os.environ.get("PGTRAJ_TORCH_SPEC", "")
            stamp = venv / ".pgtraj-training"
            if not stamp.exists() or stamp.read_text() != wanted:
                log("installing torch and the training requirements into the PL/Python environment")
                torch = os.environ.get("PGTRAJ_TORCH_SPEC")
                if torch:  # a torch build of the user's choosing first (e.g. CPU-only from another index)
                    _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *torch.split()],
                         "pip install of torch")
                _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                      str(TRAINING_REQUIREMENTS)], "pip install of the training requirements")
                stamp.write_text(wanted)
        site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         "reading the venv's site-packages").strip())
        _sync_package(site)
        _make_world_readable(venv)  # the server runs as another user (postgres)
        return site


def _sync_package(site: Path) -> None:
    target, stamp = site / "pgtraj", site / ".pgtraj-digest"
    digest = package_digest()
    if target.exists() and stamp.exists() and stamp.read_text() == digest:
        return
    # copy beside, then swap: a backend importing during the refresh never sees half a package
    staging = site / f".pgtraj-staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(PACKAGE_DIR, staging, ignore=_NOT_COPIED)
    old = site / f".pgtraj-old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    stamp.write_text(digest)


def _make_world_readable(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            mode = os.lstat(p).st_mode
            if not os.path.islink(p) and (mode & 0o044) != 0o044:
                os.chmod(p, mode | 0o044 | (0o011 if mode & 0o100 or os.path.isdir(p) else 0))


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DatabaseSetupError(f"{what} failed:\n{proc.stderr.strip()[-2000:]}",
                                 hint=f"command was: {' '.join(cmd)}")
    return proc.stdout

