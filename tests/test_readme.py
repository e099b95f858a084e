"""The README's SQL API examples, run as written through psql (meta-commands and all) against GeoLife user 0
loaded by `pgtraj load`, with tiny models registered under the README's model names. The only change made to
the text is the training budget: the README fine-tunes pgtraj-base for 300 steps, the suite trains a tiny
model.

It runs in the database pg_cron serves (the README schedules jobs) and removes what it made afterwards."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest

from pgtraj import __version__
from pgtraj.app import base_model
from pgtraj.core.features import collate, to_inputs
from pgtraj.db import registry
from pgtraj.db.cluster import PG_BINDIR
from pgtraj.db.datasets import load_geolife
from pgtraj.db.install import install
from pgtraj.learn.batches import to_tensors
from pgtraj.learn.export import export

from .test_datasets import GEOLIFE, needs_data
from .test_inference import register, trained
from .test_model import TOK, TRIPS, make_model
from .test_sql_training import TINY

README = Path(__file__).resolve().parents[1] / "README.md"
README_TRAINING = '{"init_from": "pgtraj-base", "steps": 300, "id_column": "traj_id"}'


def readme_sql() -> str:
    section = README.read_text().split("### SQL API", 1)[1]
    block = re.search(r"```sql\n(.*?)```", section, re.S).group(1)
    assert block.count(README_TRAINING) == 2, "the README's training config changed: update this test"
    return block.replace(README_TRAINING, json.dumps({**TINY, "id_column": "traj_id"}))


def shell_lines(block: str) -> list[str]:
    """The shell commands the README gives in SQL comments (`-- shell: ...`)."""
    return [m.group(1) for m in re.finditer(r"^-- shell: (.*)$", block, re.M)]


@pytest.fixture
def readme_db(cluster):
    url = cluster.url()  # cron.database_name
    install(url, python_path=cluster.python_path, log=lambda m: None)
    with psycopg.connect(url, autocommit=True) as c:
        load_geolife(c, GEOLIFE, users=[0], progress=False, log=lambda m: None)
        base_model.add(c, log=lambda m: None)  # pgtraj-base, as `pgtraj models add base` and the main job add it
        register(c, trained(1), name="geolife-next")
        register(c, make_model(seed=4).eval(), name="geolife-dest", graphs=("encoder", "destination"))
        register(c, make_model(seed=5).eval(), name="geolife-tte", graphs=("encoder", "travel_time"))
        mode = make_model(seed=6, n_classes=2).eval()
        example = to_tensors(collate([to_inputs(TOK.encode(t)) for t in TRIPS[:2]]))
        mv = registry.register(c, "geolife-mode", objective="classify", tokenizer=json.loads(TOK.to_json()),
                               artifacts={k: export(mode, k, example) for k in ("encoder", "classify")},
                               config={"train": {"max_len": 48}, "model": mode.cfg.to_dict(), "classes": ["walk", "bus"]})
        registry.deploy(c, "geolife-mode", mv.version)
    yield url
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("SELECT cron.unschedule(jobid) FROM cron.job WHERE jobname LIKE 'pgtraj%'")
        c.execute("DELETE FROM pgtraj.embedding_targets WHERE name = 'trajectories'")
        c.execute("DROP SCHEMA geolife CASCADE")
        names = ["pgtraj-base", "geolife-next", "geolife-dest", "geolife-tte", "geolife-mode", "external"]
        c.execute("DELETE FROM pgtraj.deployment_log WHERE model_name = ANY (%s)", [names])
        c.execute("DELETE FROM pgtraj.model_registry WHERE name = ANY (%s)", [names])


@needs_data
def test_readme_sql_examples_run_as_written(readme_db, tmp_path):
    block = readme_sql()
    (tmp_path / "pgtraj-output").mkdir()
    (tmp_path / "pgtraj-output" / "tokenizer.json").write_text(TOK.to_json())
    env = {"PATH": f"{PG_BINDIR}:/usr/bin:/bin", "FROM_DB": readme_db}
    for line in shell_lines(block):  # e.g. the export that the import reads back
        subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, check=True, timeout=60)
    example = to_tensors(collate([to_inputs(TOK.encode(t)) for t in TRIPS[:2]]))
    (tmp_path / "encoder.b64").write_text(base64.b64encode(export(make_model(seed=5).eval(), "encoder", example)).decode())
    # the variables the README's import_onnx example leaves to the reader (too long for psql -v)
    prelude = "\\set tokenizer_json `cat pgtraj-output/tokenizer.json`\n\\set encoder_onnx_base64 `cat encoder.b64`\n"
    (tmp_path / "readme.sql").write_text(prelude + block)

    proc = subprocess.run(
        [shutil.which("psql", path=env["PATH"]), "-X", "-v", "ON_ERROR_STOP=1", "-f", "readme.sql", readme_db],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERROR" not in proc.stderr, proc.stderr[-3000:]

    with psycopg.connect(readme_db) as c:
        one = lambda q: c.execute(q).fetchone()  # noqa: E731
        n = one("SELECT count(*) FROM geolife.trajectories")[0]
        assert one("SELECT count(embedding), count(DISTINCT embedding_model) FROM geolife.trajectories") == (n, 1)
        assert one("SELECT count(*) FROM pg_indexes WHERE schemaname = 'geolife' AND indexdef LIKE '%hnsw%'")[0] == 1
        assert one("SELECT status FROM pgtraj.job_status ORDER BY id DESC LIMIT 1")[0] == "succeeded"
        # train registered v2, import_model v3, deploy(version => 3) pinned it, rollback went back to v2's
        assert one("SELECT max(version) FROM pgtraj.model_registry WHERE name = 'geolife-next'")[0] == 3
        assert one("SELECT version FROM pgtraj.deployments WHERE name = 'geolife-next'")[0] != 3
        assert one("SELECT count(*) FROM pgtraj.model_registry WHERE name = 'external'")[0] == 1
        assert one("SELECT status FROM pgtraj.training_status WHERE model_name = 'geolife-next'"
                   " ORDER BY id DESC LIMIT 1")[0] == "succeeded"
        assert one("SELECT count(*) FROM cron.job WHERE command LIKE '%pgtraj.train%'")[0] == 0  # unscheduled
        assert one("SELECT count(*) FROM cron.job WHERE command LIKE '%process_queue%'")[0] == 0  # unscheduled
        assert one("SELECT count(*) FROM pgtraj.embedding_targets")[0] == 0  # dropped, vectors kept (above)
        assert one("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'geolife.trajectories'::regclass"
                   " AND NOT tgisinternal")[0] == 0
    # what the queries printed: the version, k rows where the README asks for k
    assert re.search(rf"^ {re.escape(__version__)}$", proc.stdout, re.M)
    assert len(re.findall(r"^\(10 rows\)$", proc.stdout, re.M)) >= 3  # similar x2 and the plain ORDER BY
    assert "(5 rows)" in proc.stdout and "(3 rows)" in proc.stdout  # predict_next k 5, predict_destination k 3
