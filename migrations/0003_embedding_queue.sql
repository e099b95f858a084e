-- 0003_embedding_queue: keeping embeddings fresh as trajectories change.
--
-- A target says which table/column pair a model keeps embedded. Triggers on the table put the key of each
-- inserted row, and of each row whose trajectory changed, into the queue; workers
-- (CALL pgtraj.process_queue, by hand or from pg_cron) take batches with FOR UPDATE SKIP LOCKED, so any
-- number can run at once. A row that keeps failing is retried with exponential backoff, then moved to
-- pgtraj.embedding_errors (the dead letters).

CREATE TABLE pgtraj.embedding_targets (
    name              text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,47}$'),
    table_name        text NOT NULL,            -- as regclass prints it
    traj_column       name NOT NULL,
    embedding_column  name NOT NULL,
    model             text NOT NULL,            -- 'name' (the deployed version at each run) or 'name@N'
    batch_size        integer NOT NULL DEFAULT 200 CHECK (batch_size BETWEEN 1 AND 100000),
    max_attempts      integer NOT NULL DEFAULT 5 CHECK (max_attempts BETWEEN 1 AND 100),
    paused            boolean NOT NULL DEFAULT false,
    created_by        name NOT NULL DEFAULT current_user,
    created_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (table_name, embedding_column)
);

CREATE TABLE pgtraj.embedding_queue (
    target           text NOT NULL REFERENCES pgtraj.embedding_targets (name) ON DELETE CASCADE,
    key              text NOT NULL,             -- the row's primary key, as text
    enqueued_at      timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    PRIMARY KEY (target, key)
);
CREATE INDEX embedding_queue_due_idx ON pgtraj.embedding_queue (target, next_attempt_at);
