"""The model registry (Python and SQL sides) and the two roles: pgtraj_user may use models,
pgtraj_admin may also register and deploy them."""

from __future__ import annotations

import hashlib

import psycopg
import pytest

from pgtraj.core.errors import NotSuperuserError, RegistryError
from pgtraj.db import registry
from pgtraj.db.install import install

from .graphs import TOKENIZER, encoder

quiet = {"log": lambda m: None}


def reg(conn, name="m", acc=None, **kw):
    metrics = {"acc": acc} if acc is not None else {}
    return registry.register(conn, name, objective="next_cell", tokenizer=TOKENIZER,
                             artifacts={"encoder": encoder(f"{name}-{acc}")}, metrics=metrics,
                             primary_metric="acc" if acc is not None else None, **kw)


def deployed_version(conn, name="m"):
    row = conn.execute("SELECT version FROM pgtraj.deployments WHERE name = %s", [name]).fetchone()
    return row and row[0]


def test_versions_increment_and_load_round_trips(db):
    with psycopg.connect(db) as conn:
        a, b = reg(conn, acc=0.1), reg(conn, acc=0.2)
        assert (a.version, b.version) == (1, 2)
        loaded = registry.load(conn, "m", "latest")
        assert loaded.version == 2 and loaded.artifacts == {"encoder": encoder("m-0.2")}
        assert loaded.tokenizer == TOKENIZER
        with pytest.raises(RegistryError, match="no deployed version"):
            registry.load(conn, "m")


def test_deploy_strategies_and_rollback_chain(db):
    with psycopg.connect(db) as conn:
        for acc in (0.3, 0.9, 0.5):
            reg(conn, acc=acc)
        assert registry.deploy(conn, "m", 1)["version"] == 1
        assert registry.deploy(conn, "m", "latest")["version"] == 3
        assert registry.deploy(conn, "m", "best")["version"] == 2
        # history 1 -> 3 -> 2: rollbacks walk back 3, then 1, then there is nothing left
        assert registry.deploy(conn, "m", "rollback")["version"] == 3
        assert registry.deploy(conn, "m", "rollback")["version"] == 1
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="no earlier deployment"):
            registry.deploy(conn, "m", "rollback")
        assert deployed_version(conn) == 1
        assert registry.load(conn, "m").version == 1
        models = {r["version"]: r["deployed"] for r in registry.list_models(conn)}
        assert models == {1: True, 2: False, 3: False}


def test_best_with_lower_is_better(db):
    with psycopg.connect(db) as conn:
        for loss in (2.0, 1.0, 3.0):
            registry.register(conn, "l", objective="mlm", tokenizer=TOKENIZER, artifacts={"encoder": encoder(str(loss))},
                               metrics={"loss": loss}, primary_metric="loss", higher_is_better=False)
        assert registry.deploy(conn, "l", "best")["version"] == 2


@pytest.mark.parametrize("version, error, text", [
    ("7", psycopg.errors.UndefinedObject, "has no version 7"),
    ("newest", psycopg.errors.InvalidParameterValue, 'invalid version "newest"'),
    ("best", psycopg.errors.InvalidParameterValue, "declares a primary metric"),
])
def test_deploy_errors(db, version, error, text):
    with psycopg.connect(db) as conn:
        reg(conn)
        with pytest.raises(error, match=text):
            registry.deploy(conn, "m", version)


def test_deploy_unknown_model_and_nulls(db):
    with psycopg.connect(db, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedObject, match='no model named "ghost"') as err:
            conn.execute("SELECT pgtraj.deploy('ghost')")
        assert "pgtraj.models" in err.value.diag.message_hint
        with pytest.raises(psycopg.errors.NullValueNotAllowed):
            conn.execute("SELECT pgtraj.deploy(NULL)")


def test_registration_is_validated(db):
    with psycopg.connect(db) as conn:
        with pytest.raises(RegistryError, match="nothing to register"):
            registry.register(conn, "m", objective="x", tokenizer={}, artifacts={})
        with pytest.raises(RegistryError, match="primary_metric 'mrr' is not among its metrics"):
            registry.register(conn, "m", objective="x", tokenizer=TOKENIZER, artifacts={"encoder": encoder()},
                              metrics={"acc": 1}, primary_metric="mrr")
        with pytest.raises(psycopg.errors.CheckViolation):
            registry.register(conn, "bad name; drop table", objective="x", tokenizer=TOKENIZER,
                              artifacts={"encoder": encoder()})


def test_artifact_digest_is_enforced_by_the_table(db):
    with psycopg.connect(db) as conn:
        mv = reg(conn)
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE pgtraj.model_artifacts SET bytes = 'tampered' WHERE model_id = %s", [mv.id])
        conn.rollback()
        stored = conn.execute("SELECT sha256 FROM pgtraj.model_artifacts WHERE model_id = %s", [mv.id]).fetchone()[0]
        assert stored == hashlib.sha256(encoder("m-None")).hexdigest()


def test_user_role_may_use_but_not_train_deploy_or_install(db, login_role):
    with psycopg.connect(db) as conn:
        reg(conn, acc=0.5)
        registry.deploy(conn, "m", 1)
    user = login_role("pgtraj_user")(db)
    with psycopg.connect(user, autocommit=True) as conn:
        assert conn.execute("SELECT pgtraj.version()").fetchone()[0]
        assert conn.execute("SELECT pgtraj.runtime_info() ->> 'pgtraj'").fetchone()[0]
        assert conn.execute("SELECT count(*) FROM pgtraj.models WHERE deployed").fetchone()[0] == 1
        assert registry.load(conn, "m").artifacts["encoder"] == encoder("m-0.5")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pgtraj.deploy('m', '1')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reg(conn, acc=0.7)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO pgtraj.training_runs (model_name, source, objective) VALUES ('m', 't', 'x')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE pgtraj.installation SET python_path = '/tmp/evil'")
    with pytest.raises(NotSuperuserError):
        install(user, **quiet)


def test_admin_role_may_register_and_deploy(db, login_role):
    admin = login_role("pgtraj_admin")(db)
    with psycopg.connect(admin) as conn:
        mv = reg(conn, acc=0.5)
        assert registry.deploy(conn, "m", mv.version)["version"] == 1
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE pgtraj.installation SET python_path = '/tmp/evil'")
    with pytest.raises(NotSuperuserError):
        install(admin, **quiet)


def test_roles_without_membership_cannot_see_pgtraj(db, login_role):
    with psycopg.connect(login_role()(db), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pgtraj.version()")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM pgtraj.models")
