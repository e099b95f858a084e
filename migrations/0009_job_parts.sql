-- 0009_job_parts: CALL pgtraj.embed_table(..., workers => n) fills a column with n backends at once: the
-- calling one and n - 1 background sessions pg_cron starts as the caller. The stale keys are cut into key
-- ranges (parts); each backend takes a part, embeds it batch by batch from its cursor, committing each
-- batch with the part's counts. A part whose backend is gone is taken over from its cursor, so a killed
-- session loses nothing. Written only through pgtraj's SECURITY DEFINER functions (sql/50_batch.sql).

CREATE TABLE pgtraj.job_parts (
    job         bigint NOT NULL REFERENCES pgtraj.jobs (id) ON DELETE CASCADE,
    part        integer NOT NULL,
    slot        integer NOT NULL,        -- the backend meant to take it first: 0 the caller's, 1.. pg_cron's
    after_key   text,                    -- keys above this (NULL: from the first), as text
    last_key    text,                    -- and up to this one (NULL: to the last)
    cursor      text,                    -- the last key of the last committed batch
    status      text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done', 'failed')),
    pid         integer,                 -- the backend holding it now
    holders     integer[] NOT NULL DEFAULT '{}',  -- every backend that held it (a killed one, its successor)
    claimed_at  timestamptz,
    embedded    bigint NOT NULL DEFAULT 0,
    failed      bigint NOT NULL DEFAULT 0,
    batches     integer NOT NULL DEFAULT 0,
    error       text,
    PRIMARY KEY (job, part)
);
