"""pg_regress-style tests: tests/sql/NAME.sql runs through psql in a fresh database with pgtraj installed,
and its output must equal tests/sql/expected/NAME.out. Regenerate after an intended change with
PGTRAJ_REGEN=1 pytest tests/test_sql_regress.py, and review the diff."""

from __future__ import annotations

import difflib
import os
import subprocess
from pathlib import Path

import pytest

SQL_DIR = Path(__file__).parent / "sql"
CASES = sorted(p.stem for p in SQL_DIR.glob("*.sql"))


def run_psql(dsn: str, script: Path) -> str:
    env = {**os.environ, "PGTZ": "UTC", "PGDATESTYLE": "ISO", "PGOPTIONS": "-c lc_messages=C"}
    proc = subprocess.run(["psql", "-X", "-a", "-q", "-v", "VERBOSITY=terse", "-d", dsn, "-f", str(script)],
                          capture_output=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    # psql prefixes errors with the script path; keep the expected files independent of where the repo is
    return proc.stdout.replace(f"psql:{script}:", "psql:")


@pytest.mark.parametrize("case", CASES)
def test_sql(case, db):
    actual = run_psql(db, SQL_DIR / f"{case}.sql")
    expected_file = SQL_DIR / "expected" / f"{case}.out"
    if os.environ.get("PGTRAJ_REGEN"):
        expected_file.write_text(actual)
    expected = expected_file.read_text()
    if actual != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                            f"expected/{case}.out", f"actual/{case}.out"))
        pytest.fail(f"SQL output differs from tests/sql/expected/{case}.out:\n{diff}")
