-- pgtraj SQL API, part 6: keeping embeddings fresh (targets, trigger-fed queue, workers, pg_cron).

GRANT SELECT ON pgtraj.embedding_targets, pgtraj.embedding_queue TO pgtraj_user;
GRANT INSERT, UPDATE, DELETE ON pgtraj.embedding_targets, pgtraj.embedding_queue TO pgtraj_user;

-- Trigger side: the row's key goes (back) into the queue. SECURITY DEFINER: whoever writes the table may
-- not have rights on pgtraj's tables, and must not need them.
CREATE OR REPLACE FUNCTION pgtraj._enqueue() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    k text;
BEGIN
    EXECUTE format('SELECT ($1).%I::text', TG_ARGV[1]) INTO k USING NEW;
    INSERT INTO pgtraj.embedding_queue AS q (target, key) VALUES (TG_ARGV[0], k)
    ON CONFLICT (target, key) DO UPDATE
        SET enqueued_at = now(), attempts = 0, next_attempt_at = now(), last_error = NULL;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION pgtraj._enqueue() FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgtraj.create_embedding_target(name text, source regclass, traj_column name,
                                                          embedding_column name, model text,
                                                          batch_size integer DEFAULT 200,
                                                          max_attempts integer DEFAULT 5,
                                                          backfill boolean DEFAULT true)
RETURNS bigint
LANGUAGE plpython3u VOLATILE STRICT AS $$
@BOOT@
rt = GD['pgtraj']
threads = plpy.execute("SELECT current_setting('pgtraj.threads', true) AS t")[0]["t"]
return rt.inference.call(plpy, rt.queue.create_target, name, source, traj_column, embedding_column, model,
                         batch_size, max_attempts, backfill, threads)
$$;
COMMENT ON FUNCTION pgtraj.create_embedding_target(text, regclass, name, name, text, integer, integer, boolean) IS
    'Keeps a vector column embedded: triggers queue inserted rows and rows whose trajectory changed (returns the rows queued by backfill)';

CREATE OR REPLACE FUNCTION pgtraj.drop_embedding_target(name text) RETURNS void
LANGUAGE plpython3u VOLATILE STRICT AS $$
@BOOT@
rt = GD['pgtraj']
rt.inference.call(plpy, rt.queue.drop_target, name)
$$;
COMMENT ON FUNCTION pgtraj.drop_embedding_target(text) IS 'Removes a target, its triggers and its queue (embeddings stay)';

CREATE OR REPLACE PROCEDURE pgtraj.process_queue(target text DEFAULT NULL, max_batches integer DEFAULT NULL)
LANGUAGE plpython3u AS $$
@BOOT@
rt = GD['pgtraj']
threads = plpy.execute("SELECT current_setting('pgtraj.threads', true) AS t")[0]["t"]
rt.inference.call(plpy, rt.queue.process_queue, target, max_batches, threads)
$$;
COMMENT ON PROCEDURE pgtraj.process_queue(text, integer) IS
    'Embeds queued rows of a target (NULL: every target not paused), batch by batch; safe to run many at once';

CREATE OR REPLACE FUNCTION pgtraj.pause_embedding(name text) RETURNS void
LANGUAGE plpgsql VOLATILE STRICT AS $$
BEGIN
    UPDATE pgtraj.embedding_targets t SET paused = true WHERE t.name = pause_embedding.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgtraj: no embedding target named %', quote_literal(name) USING ERRCODE = '42704';
    END IF;
END
$$;
COMMENT ON FUNCTION pgtraj.pause_embedding(text) IS 'Workers skip this target (triggers still queue changes)';

CREATE OR REPLACE FUNCTION pgtraj.resume_embedding(name text) RETURNS void
LANGUAGE plpgsql VOLATILE STRICT AS $$
BEGIN
    UPDATE pgtraj.embedding_targets t SET paused = false WHERE t.name = resume_embedding.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgtraj: no embedding target named %', quote_literal(name) USING ERRCODE = '42704';
    END IF;
END
$$;
COMMENT ON FUNCTION pgtraj.resume_embedding(text) IS 'Workers take this target''s queue again';

-- pg_cron jobs of pgtraj (refresh here, training in 80_training.sql): scheduled by name, so that scheduling
-- again replaces the job, and pg_cron never runs two instances of one job at once. `instead` completes the
-- hint for databases without pg_cron: what to run from another scheduler.
CREATE OR REPLACE FUNCTION pgtraj._cron_schedule(job text, schedule text, command text, instead text) RETURNS bigint
LANGUAGE plpgsql VOLATILE STRICT AS $$
BEGIN
    IF to_regnamespace('cron') IS NULL THEN
        RAISE EXCEPTION 'pgtraj: pg_cron is not enabled in this database' USING ERRCODE = '0A000',
              HINT = 'CREATE EXTENSION pg_cron in the database named by cron.database_name (pgtraj install does it'
                     ' when possible), or ' || instead || ' from any scheduler';
    END IF;
    RETURN cron.schedule(job, schedule, command);
END
$$;

CREATE OR REPLACE FUNCTION pgtraj._cron_unschedule(job text) RETURNS boolean
LANGUAGE plpgsql VOLATILE STRICT AS $$
BEGIN
    IF to_regnamespace('cron') IS NULL OR NOT EXISTS (SELECT 1 FROM cron.job j WHERE j.jobname = job) THEN
        RETURN false;
    END IF;
    RETURN cron.unschedule(job);
END
$$;

-- One job per target, named pgtraj-refresh-<target>; SKIP LOCKED keeps even hand-started workers apart.
CREATE OR REPLACE FUNCTION pgtraj.schedule_refresh(name text, schedule text DEFAULT '* * * * *') RETURNS bigint
LANGUAGE plpgsql VOLATILE STRICT AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgtraj.embedding_targets t WHERE t.name = schedule_refresh.name) THEN
        RAISE EXCEPTION 'pgtraj: no embedding target named %', quote_literal(name) USING ERRCODE = '42704';
    END IF;
    RETURN pgtraj._cron_schedule('pgtraj-refresh-' || name, schedule, format('CALL pgtraj.process_queue(%L)', name),
                                 'run CALL pgtraj.process_queue()');
END
$$;
COMMENT ON FUNCTION pgtraj.schedule_refresh(text, text) IS
    'Runs pgtraj.process_queue for a target on a pg_cron schedule (default every minute); returns the cron job id';

CREATE OR REPLACE FUNCTION pgtraj.unschedule_refresh(name text) RETURNS boolean
LANGUAGE sql VOLATILE STRICT AS $$ SELECT pgtraj._cron_unschedule('pgtraj-refresh-' || name) $$;
COMMENT ON FUNCTION pgtraj.unschedule_refresh(text) IS 'Removes a target''s pg_cron job (false if there was none)';

-- What a person checks: per target, what waits, what is being retried, what failed, and the last run.
CREATE OR REPLACE VIEW pgtraj.embedding_status AS
SELECT t.name, t.table_name, t.embedding_column, t.model, t.paused,
       count(q.key) FILTER (WHERE q.attempts = 0)  AS pending,
       count(q.key) FILTER (WHERE q.attempts > 0)  AS retrying,
       (SELECT count(*) FROM pgtraj.embedding_errors e
         WHERE e.table_name = t.table_name AND e.embedding_column = t.embedding_column) AS failed,
       r.status AS last_run_status, r.finished_at AS last_run_at, (r.progress ->> 'embedded')::bigint AS last_run_embedded,
       r.error AS last_run_error
  FROM pgtraj.embedding_targets t
  LEFT JOIN pgtraj.embedding_queue q ON q.target = t.name
  LEFT JOIN LATERAL (SELECT s.status, s.finished_at, j.progress, s.error FROM pgtraj.jobs j
                       JOIN pgtraj.job_status s ON s.id = j.id
                      WHERE j.kind = 'refresh' AND j.args ->> 'target' = t.name ORDER BY j.id DESC LIMIT 1) r ON true
 GROUP BY t.name, t.table_name, t.embedding_column, t.model, t.paused, r.status, r.finished_at, r.progress, r.error;
COMMENT ON VIEW pgtraj.embedding_status IS 'Per embedding target: pending, retrying and failed rows, and the last worker run';
GRANT SELECT ON pgtraj.embedding_status TO pgtraj_user;
