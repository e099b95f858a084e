"""The model registry from Python: register versions with their ONNX graphs, load them, deploy them.

The same tables back the SQL API (pgtraj.models, pgtraj.deployments, pgtraj.deploy); registering needs
the pgtraj_admin role (or a superuser), reading needs pgtraj_user.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pgtraj.core.errors import RegistryError


@dataclass
class ModelVersion:
    id: int
    name: str
    version: int
    objective: str
    tokenizer: dict
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    embedding_dim: int | None = None
    artifacts: dict[str, bytes] = field(default_factory=dict)


def register(conn: psycopg.Connection, name: str, *, objective: str, tokenizer: dict,
             artifacts: dict[str, bytes], config: dict | None = None, metrics: dict | None = None,
             primary_metric: str | None = None, higher_is_better: bool = True,
             embedding_dim: int | None = None, training_run_id: int | None = None,
             description: str | None = None) -> ModelVersion:
    """Store a new version of model ``name`` (version = previous + 1) with its ONNX graphs, atomically."""
    if not artifacts:
        raise RegistryError(f"model {name!r}: nothing to register", hint="pass at least one ONNX graph in artifacts")
    if primary_metric is not None and primary_metric not in (metrics or {}):
        raise RegistryError(f"model {name!r}: primary_metric {primary_metric!r} is not among its metrics",
                            hint=f"metrics has: {sorted(metrics or {})}")
    # pgtraj._register is the one write path into the registry: it checks every graph and numbers the
    # version under a lock, and needs pgtraj_admin
    kinds = list(artifacts)
    with conn.transaction():
        model_id, version = conn.execute(
            """SELECT model_id, version FROM pgtraj._register(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::text[],
                                                               %s::bytea[])""",
            [name, objective, Jsonb(config or {}), Jsonb(tokenizer), Jsonb(metrics or {}), primary_metric,
             higher_is_better, embedding_dim, training_run_id, description, kinds,
             [artifacts[k] for k in kinds]]).fetchone()
    return ModelVersion(model_id, name, version, objective, tokenizer, config or {}, metrics or {},
                        embedding_dim, dict(artifacts))


def load(conn: psycopg.Connection, name: str, version: int | str = "deployed") -> ModelVersion:
    """A version by number, 'latest', or 'deployed' (the default), with its artifacts."""
    with conn.cursor() as cur:
        if version == "deployed":
            cur.execute("SELECT model_id FROM pgtraj.deployments WHERE name = %s", [name])
        elif version == "latest":
            cur.execute("SELECT id FROM pgtraj.model_registry WHERE name = %s ORDER BY version DESC LIMIT 1", [name])
        else:
            cur.execute("SELECT id FROM pgtraj.model_registry WHERE name = %s AND version = %s", [name, int(version)])
        row = cur.fetchone()
        if row is None:
            raise RegistryError(f"no {version} version of model {name!r}",
                                hint="SELECT name, version, deployed FROM pgtraj.models lists what exists")
        cur.execute("""SELECT id, name, version, objective, tokenizer, config, metrics, embedding_dim
                         FROM pgtraj.model_registry WHERE id = %s""", [row[0]])
        mv = ModelVersion(*cur.fetchone())
        cur.execute("SELECT kind, bytes, sha256 FROM pgtraj.model_artifacts WHERE model_id = %s", [mv.id])
        for kind, data, sha in cur.fetchall():
            data = bytes(data)
            if hashlib.sha256(data).hexdigest() != sha:  # the table CHECK makes this unreachable unless tampered
                raise RegistryError(f"artifact {kind!r} of {name} v{mv.version} fails its sha256 check")
            mv.artifacts[kind] = data
    return mv


def deploy(conn: psycopg.Connection, name: str, version: int | str = "latest", note: str | None = None) -> dict:
    """Deploy through the SQL function (same checks, same history); returns the deployment row."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT * FROM pgtraj.deploy(%s, %s, %s)", [name, str(version), note])
        return cur.fetchone()


def list_models(conn: psycopg.Connection) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute("""SELECT name, version, objective, embedding_dim, primary_metric, primary_metric_value,
                              deployed, artifacts, artifact_bytes, created_at, resolution, vocabulary_cells, timezone
                         FROM pgtraj.models
                        ORDER BY name, version""")
        return cur.fetchall()

