-- 0001_registry: model registry, deployments, training runs and batch jobs.
--
-- Applied once per database by `pgtraj install`, inside the install transaction, and recorded in
-- pgtraj.schema_migrations with its sha256 (an edited, already-applied migration is refused).
-- Plain tables in the pgtraj schema: pg_dump / pg_restore carry models, deployments and history.

-- One row per installed database: the pgtraj version and where PL/Python finds the runtime.
-- Only the installing superuser writes it; the runtime path is read from here (not from a setting any
-- role could SET) so that no unprivileged role can choose what PL/Python imports.
CREATE TABLE pgtraj.installation (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version       text NOT NULL,
    python_path   text,
    installed_at  timestamptz NOT NULL DEFAULT now(),
    upgraded_at   timestamptz NOT NULL DEFAULT now()
);

-- A training run: started from Python (`pgtraj train`) or from SQL (pgtraj.train), scheduled or not.
CREATE TABLE pgtraj.training_runs (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model_name   text NOT NULL,
    source       text NOT NULL,
    objective    text NOT NULL,
    config       jsonb NOT NULL DEFAULT '{}',
    status       text NOT NULL DEFAULT 'running'
                 CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    metrics      jsonb NOT NULL DEFAULT '{}',
    error        text,
    device       text,
    started_by   name NOT NULL DEFAULT current_user,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    CHECK ((status = 'running') = (finished_at IS NULL))
);

-- A model version. The tokenizer vocabulary and the resolved config travel with it (never looked up
-- elsewhere by name); the ONNX graphs are in model_artifacts.
CREATE TABLE pgtraj.model_registry (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name              text NOT NULL
                      CONSTRAINT model_name_is_simple CHECK (name ~ '^[A-Za-z][A-Za-z0-9_.-]{0,62}$'),
    version           integer NOT NULL CHECK (version > 0),
    objective         text NOT NULL,
    config            jsonb NOT NULL DEFAULT '{}',
    tokenizer         jsonb NOT NULL,
    metrics           jsonb NOT NULL DEFAULT '{}',
    primary_metric    text,             -- the key of `metrics` that 'best' and auto-deploy compare
    higher_is_better  boolean NOT NULL DEFAULT true,
    embedding_dim     integer CHECK (embedding_dim > 0),
    training_run_id   bigint REFERENCES pgtraj.training_runs (id) ON DELETE SET NULL,
    description       text,
    created_by        name NOT NULL DEFAULT current_user,
    created_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (name, version),
    CONSTRAINT primary_metric_in_metrics CHECK (primary_metric IS NULL OR metrics ? primary_metric)
);

-- ONNX graphs of a model version, one per kind ('encoder', 'next_cell', 'destination', ...).
-- The CHECK makes the stored digest impossible to get wrong: the runtime caches sessions by it.
CREATE TABLE pgtraj.model_artifacts (
    model_id  bigint NOT NULL REFERENCES pgtraj.model_registry (id) ON DELETE CASCADE,
    kind      text NOT NULL CHECK (kind ~ '^[a-z][a-z0-9_]*$'),
    format    text NOT NULL DEFAULT 'onnx' CHECK (format IN ('onnx')),
    bytes     bytea NOT NULL,
    sha256    text NOT NULL,
    CONSTRAINT sha256_matches_bytes CHECK (sha256 = encode(sha256(bytes), 'hex')),
    PRIMARY KEY (model_id, kind)
);
-- ONNX weights are float arrays that do not compress: skip the pglz attempt, keep TOAST out-of-line
ALTER TABLE pgtraj.model_artifacts ALTER COLUMN bytes SET STORAGE EXTERNAL;

-- Append-only deployment history; the live model of a name is its newest row. `previous_id` is the
-- row this one replaced, so repeated rollbacks walk back through history instead of toggling.
CREATE TABLE pgtraj.deployment_log (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model_name   text NOT NULL,
    model_id     bigint NOT NULL REFERENCES pgtraj.model_registry (id),
    strategy     text NOT NULL CHECK (strategy IN ('version', 'latest', 'best', 'rollback', 'auto')),
    previous_id  bigint REFERENCES pgtraj.deployment_log (id),
    note         text,
    deployed_by  name NOT NULL DEFAULT current_user,
    deployed_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX deployment_log_name_idx ON pgtraj.deployment_log (model_name, id DESC);

-- Batch work (embedding refreshes, scheduled training): one row per run, progress updated as it goes,
-- so a status view can show what is running, what failed and why.
CREATE TABLE pgtraj.jobs (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind         text NOT NULL,
    args         jsonb NOT NULL DEFAULT '{}',
    status       text NOT NULL DEFAULT 'queued'
                 CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    done         bigint NOT NULL DEFAULT 0,
    total        bigint,
    error        text,
    created_by   name NOT NULL DEFAULT current_user,
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz
);
