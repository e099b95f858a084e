"""CALL pgtraj.train: training inside the database from a table or a query, run records, registration,
deploy-if-better, refusals, cancel, and schedules on pg_cron."""

from __future__ import annotations

import json
import re
import threading
import time

import psycopg
import pytest

from pgtraj.db.install import install

from .test_inference import LINE
from .test_model import TRIPS

TINY = {"preset": "tiny", "steps": 6, "batch_size": 8, "max_len": 48, "warmup": 1, "eval_every": 3,
        "eval_batches": 1, "min_trajectories": 4, "tokenizer": {"resolution": 9, "min_count": 1,
                                                                "coarsest_resolution": 6}}


def make_table(c, name="trips", n=60):
    c.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, geom geometry(LineStringM, 4326), split text)")
    for i, t in enumerate(TRIPS[:n]):
        c.execute(f"INSERT INTO {name} VALUES (%s, {LINE}, %s)",
                  [i, t.lon.tolist(), t.lat.tolist(), t.t.tolist(), "val" if i % 5 == 0 else "train"])


@pytest.fixture
def conn(db):
    with psycopg.connect(db, autocommit=True) as c:
        make_table(c)
        yield c


def train(c, name="sq", source="trips", objective="next_cell", config=None, deploy="auto"):
    c.execute("CALL pgtraj.train(%s, %s, %s, %s::jsonb, %s)",
              [name, source, objective, json.dumps(config or TINY), deploy])


def test_train_registers_deploys_and_serves(conn, db):
    said = []
    conn.add_notice_handler(lambda d: said.append(d.message_primary))
    train(conn)
    status, outcome, loss = conn.execute("SELECT status, outcome, val_loss FROM pgtraj.training_status").fetchone()
    assert status == "succeeded" and outcome == "registered v1, deployed" and loss > 0
    assert any(re.search(r"\d+ train / \d+ val pieces from trips", m) for m in said), said
    assert any("step 6/6" in m for m in said), said
    graphs = conn.execute("SELECT artifacts FROM pgtraj.models WHERE name = 'sq'").fetchone()[0]
    assert graphs == ["encoder", "next_move", "token_nll", "weights"]
    rows = conn.execute("SELECT count(*) FROM pgtraj.predict_next((SELECT geom FROM trips WHERE id = 3), 'sq')"
                        ).fetchone()
    assert rows == (5,)
    with psycopg.connect(db) as fresh:  # a backend that only serves the model never loads torch
        fresh.execute("SELECT pgtraj.embed(geom, 'sq') FROM trips LIMIT 1")
        assert fresh.execute("SELECT pgtraj.runtime_info() ->> 'torch_loaded'").fetchone() == ("false",)


def test_deploy_only_when_better(conn):
    train(conn, config={**TINY, "steps": 30})
    train(conn, config={**TINY, "steps": 1, "lr": 1e-6})  # barely trained: worse on val_loss
    outcome = conn.execute("SELECT outcome FROM pgtraj.training_status ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert outcome.startswith("registered v2, not deployed: val_loss")
    assert conn.execute("SELECT version FROM pgtraj.deployments WHERE name = 'sq'").fetchone() == (1,)
    train(conn, config={**TINY, "steps": 1, "lr": 1e-6}, deploy="always")
    assert conn.execute("SELECT version FROM pgtraj.deployments WHERE name = 'sq'").fetchone() == (3,)


def test_auto_deploy_compares_models_of_other_tokenizers_by_the_next_move_only(conn):
    """A val_loss over another vocabulary is not comparable; the next-move loss is (same resolution)."""
    train(conn, config={**TINY, "steps": 30})
    other = {**TINY, "steps": 1, "lr": 1e-6, "tokenizer": {**TINY["tokenizer"], "min_count": 3}}
    train(conn, config=other)
    outcome = conn.execute("SELECT outcome FROM pgtraj.training_status ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert re.fullmatch(r"registered v2, not deployed: v2 has another tokenizer than the deployed v1; its next-move"
                        r" val_loss \d+\.\d+ is not better than \d+\.\d+", outcome), outcome
    conn.execute("UPDATE pgtraj.model_registry SET metrics = metrics - 'val_move_ce' WHERE version = 1")
    train(conn, config={**other, "steps": 30})
    outcome = conn.execute("SELECT outcome FROM pgtraj.training_status ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert "so their val_loss cannot be compared" in outcome, outcome
    assert conn.execute("SELECT version FROM pgtraj.deployments WHERE name = 'sq'").fetchone() == (1,)


def test_auto_deploy_over_a_version_without_val_loss_or_of_another_objective(conn):
    train(conn)
    conn.execute("UPDATE pgtraj.model_registry SET metrics = metrics - 'val_loss', primary_metric = NULL")  # as registered by a client
    train(conn, config={**TINY, "steps": 1, "lr": 1e-6})
    outcome = conn.execute("SELECT outcome FROM pgtraj.training_status ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert outcome == "registered v2, deployed (the deployed v1 has no val_loss to compare with)"
    train(conn, objective="hybrid")
    outcome = conn.execute("SELECT outcome FROM pgtraj.training_status ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert outcome == "registered v3, deployed (the deployed v2 was trained for next_cell)"


def test_train_from_a_query_with_hybrid(conn):
    train(conn, name="hq", source="SELECT id, geom, split FROM trips WHERE id < 50", objective="hybrid")
    assert conn.execute("SELECT artifacts FROM pgtraj.models WHERE name = 'hq'").fetchone()[0] == ["encoder", "masked_logp", "weights"]
    assert conn.execute("SELECT vector_dims(pgtraj.embed(geom, 'hq')) FROM trips LIMIT 1").fetchone() == (32,)


def test_a_failed_run_is_recorded_and_changes_nothing(conn):
    train(conn)
    conn.execute("UPDATE trips SET split = 'test'")  # nothing left to train on
    with pytest.raises(psycopg.Error) as err:
        train(conn)
    assert "no 'train' trajectories to train with" in str(err.value)
    status, outcome, error = conn.execute("SELECT status, outcome, error FROM pgtraj.training_status"
                                          " ORDER BY id DESC LIMIT 1").fetchone()
    assert status == "failed" and outcome == "nothing registered" and "no 'train' trajectories" in error
    assert conn.execute("SELECT count(*), max(version) FROM pgtraj.model_registry").fetchone() == (1, 1)


def test_fine_tune_from_a_registered_model(conn):
    """init_from names a registered model: fine-tuning starts from its stored weights (and, on data whose
    cells it knows, its vocabulary), and the shape comes with it."""
    train(conn, name="pre", objective="foundation")
    said = []
    conn.add_notice_handler(lambda d: said.append(d.message_primary))
    config = {k: v for k, v in TINY.items() if k != "preset"}
    train(conn, name="ft", config={**config, "init_from": "pre"})
    assert any("initialised from pre v1 (pretrained 6 steps, foundation)" in m for m in said), said
    assert any("with the pretrained vocabulary (it knows 100%" in m for m in said), said
    same = conn.execute("SELECT a.tokenizer = b.tokenizer, a.config -> 'model' = b.config -> 'model'"
                        " FROM pgtraj.model_registry a, pgtraj.model_registry b WHERE a.name = 'pre' AND b.name = 'ft'"
                        ).fetchone()
    assert same == (True, True)
    assert conn.execute("SELECT count(*) FROM pgtraj.predict_next((SELECT geom FROM trips WHERE id = 3), 'ft')"
                        ).fetchone()[0] >= 1
    with pytest.raises(psycopg.Error, match="another model shape than this config: d_ff 512 here, 64 there, d_model 128 here, 32 there"):
        train(conn, name="ft", config={**config, "preset": "small", "init_from": "pre"})


def test_fine_tuning_starts_from_the_base_model_by_default(conn):
    """init_from 'auto' (the default): from pgtraj-base where it is registered and suits the run's
    resolution and shape, else from scratch; a NOTICE says which and why, and null opts out."""
    said = []
    conn.add_notice_handler(lambda d: said.append(d.message_primary))
    config = {k: v for k, v in TINY.items() if k != "preset"}
    train(conn, name="a", config={**config, "preset": "tiny"})
    assert any("from scratch (init_from 'auto': pgtraj-base is not registered here" in m for m in said), said
    train(conn, name="pgtraj-base", objective="foundation")  # stands in for the shipped base model (tiny here)
    said.clear()
    train(conn, name="b", config=config)
    assert any("training from pgtraj-base v1 (init_from 'auto'" in m for m in said), said
    assert any("initialised from pgtraj-base v1" in m for m in said), said
    for over, why in (({"tokenizer": {**TINY["tokenizer"], "resolution": 8}}, "resolution 8, pgtraj-base v1 has 9"),
                      ({"preset": "small"}, "d_ff, d_model, n_heads, n_layers differ from pgtraj-base v1's"),
                      ({"init_from": None}, None)):
        said.clear()
        train(conn, name="c", config={**config, **over})
        assert not any("initialised from" in m for m in said), (over, said)
        assert why is None or any(why in m for m in said), (over, said)


def test_init_from_cannot_name_a_file_from_sql(conn, tmp_path):
    """The attack: a checkpoint is a pickle, and unpickling runs code. init_from names registered models
    only, so a caller of CALL pgtraj.train cannot make the server load a file."""
    import os
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "checkpoint.pt"
    evil.write_bytes(pickle.dumps(Payload()))
    os.chmod(tmp_path, 0o755)
    os.chmod(evil, 0o644)
    with pytest.raises(psycopg.Error) as err:
        train(conn, name="ft", config={**TINY, "init_from": str(evil)})
    assert err.value.sqlstate == "22023" and "invalid model name" in str(err.value), str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("args, sqlstate", [
    (dict(config={**TINY, "stepz": 3}), "22023"),
    (dict(objective="teleport"), "22023"),
    (dict(name="bad name!"), "22023"),
    (dict(deploy="sometimes"), "22023"),
    (dict(source="nope"), "42P01"),
    (dict(config={**TINY, "split_column": "nope"}), "42703"),
    (dict(config={**TINY, "tokenizer": {"resolution": 13}}), "22023"),  # refused before any row is read
    (dict(config={**TINY, "tokenizer": {"timezone": "Mars/Olympus_Mons"}}), "22023"),
    (dict(config={**TINY, "cleaning": {"profile": "spaceship"}}), "22023"),
    (dict(config={**TINY, "cleaning": {"max_discard": 2}}), "22023"),
    (dict(config={**TINY, "split_by": "coin"}), "22023"),
    (dict(config={**TINY, "vocabulary": "borrowed"}), "22023"),
])
def test_refusals(conn, args, sqlstate):
    with pytest.raises(psycopg.Error) as err:
        train(conn, **args)
    assert err.value.sqlstate == sqlstate, str(err.value)
    assert conn.execute("SELECT count(*) FROM pgtraj.model_registry").fetchone() == (0,)


def test_only_admins_train_and_runs_do_not_overlap(conn, db, login_role):
    with psycopg.connect(login_role("pgtraj_user")(db), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            train(c)
    with psycopg.connect(db, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtext('pgtraj.train'), hashtext('sq'))")
        with pytest.raises(psycopg.Error) as err:
            train(conn)
        assert err.value.sqlstate == "55P03"


@pytest.mark.parametrize("moment", ["reading", "training", "timeout"])
def test_cancel_stops_training_cleanly(conn, db, moment):
    """A cancel (pg_cancel_backend or statement_timeout) while the data is read or while the model trains
    ends the run as 'cancelled' with 57014, registers nothing, and leaves no run 'running'."""
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    errors, said = [], []
    conn.add_notice_handler(lambda d: said.append(d.message_primary))
    if moment == "reading":  # enough rows that reading takes a while
        conn.execute("INSERT INTO trips SELECT id + k * 1000, geom, split FROM trips, generate_series(1, 40) AS k")
    if moment == "timeout":
        conn.execute("SET statement_timeout = '8s'")

    def run():
        try:
            train(conn, config={**TINY, "steps": 100000, "eval_every": 100000})
        except psycopg.Error as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    with psycopg.connect(db, autocommit=True) as other:
        deadline = time.time() + 120
        while not other.execute("SELECT count(*) FROM pgtraj.training_runs WHERE status = 'running'").fetchone()[0]:
            assert time.time() < deadline
            time.sleep(0.05)
        if moment == "training":  # logged just before the first step
            while not any("parameters, vocabulary" in m for m in said):
                assert time.time() < deadline
                time.sleep(0.05)
        if moment != "timeout":
            other.execute("SELECT pg_cancel_backend(%s)", [pid])
        worker.join(120)
        assert errors and errors[0].sqlstate == "57014", errors
        assert other.execute("SELECT status, outcome FROM pgtraj.training_status").fetchone() == (
            "cancelled", "nothing registered")
        assert other.execute("SELECT count(*) FROM pgtraj.model_registry").fetchone() == (0,)


def test_schedule_training(cluster, conn):
    with pytest.raises(psycopg.errors.FeatureNotSupported):
        conn.execute("SELECT pgtraj.schedule_training('sq', '0 3 * * *', 'trips')")
    url = cluster.url()
    install(url, python_path=cluster.python_path, log=lambda m: None)
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS cron_train")
        make_table(c, "cron_train", n=30)
        try:
            job = c.execute("SELECT pgtraj.schedule_training('cronsq', '0 3 * * *', 'cron_train', 'next_cell', %s)",
                            [json.dumps(TINY)]).fetchone()[0]
            command = c.execute("SELECT command FROM cron.job WHERE jobid = %s", [job]).fetchone()[0]
            c.execute(command)  # what pg_cron runs at 03:00
            assert c.execute("SELECT status FROM pgtraj.training_status WHERE model_name = 'cronsq'").fetchone() == (
                "succeeded",)
            assert c.execute("SELECT pgtraj.unschedule_training('cronsq')").fetchone() == (True,)
        finally:
            c.execute("SELECT pgtraj.unschedule_training('cronsq')")
            c.execute("DROP TABLE cron_train")


def test_classify_trained_from_sql_with_a_label_column(conn):
    """label_column, spelt as everywhere (CLI --label-column, Python label_column): a classifier trained by
    CALL pgtraj.train, served by pgtraj.classify."""
    conn.execute("ALTER TABLE trips ADD COLUMN mode text")
    conn.execute("UPDATE trips SET mode = CASE WHEN id % 2 = 0 THEN 'walk' ELSE 'bus' END")
    train(conn, name="modes", objective="classify", config={**TINY, "label_column": "mode"})
    config = conn.execute("SELECT config FROM pgtraj.models WHERE name = 'modes'").fetchone()[0]
    assert sorted(config["classes"]) == ["bus", "walk"] and config["label_column"] == "mode"
    labels = conn.execute("SELECT array_agg(label ORDER BY rank) FROM pgtraj.classify((SELECT geom FROM trips"
                          " WHERE id = 3), 'modes', k => 2)").fetchone()[0]
    assert sorted(labels) == ["bus", "walk"]
