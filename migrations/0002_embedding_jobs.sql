-- 0002_embedding_jobs: bookkeeping for batch embedding (pgtraj.embed_table and the refresh queue).

-- The backend running a job: a 'running' row whose backend has gone was interrupted (a cancelled or
-- killed batch job cannot update its own row), which the job_status view reports.
ALTER TABLE pgtraj.jobs ADD COLUMN pid integer;
ALTER TABLE pgtraj.jobs ADD COLUMN progress jsonb NOT NULL DEFAULT '{}';
CREATE INDEX jobs_kind_idx ON pgtraj.jobs (kind, id DESC);

-- Rows that could not be embedded (dead letters): what failed, why, how often. A row leaves this table
-- when it is embedded successfully.
CREATE TABLE pgtraj.embedding_errors (
    table_name        text NOT NULL,    -- schema-qualified, as regclass prints it
    embedding_column  name NOT NULL,
    key               text NOT NULL,    -- the row's primary key, as text
    model_id          bigint REFERENCES pgtraj.model_registry (id) ON DELETE CASCADE,
    sqlstate          text,
    error             text NOT NULL,
    attempts          integer NOT NULL DEFAULT 1,
    first_failed_at   timestamptz NOT NULL DEFAULT now(),
    last_failed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, embedding_column, key)
);
