-- pgtraj SQL API, part 6: keeping embeddings fresh (targets, trigger-fed queue, workers, pg_cron).
--
-- A target, its queue and its dead letters are written only through the SECURITY DEFINER functions below,
-- each of which checks that the caller may read the table's key and trajectory and write its embedding
-- column: nobody can point a target at a table they could not fill themselves, queue keys of such a
-- table, or make a more privileged worker (an administrator, pg_cron) write where they could not.

-- Trigger side: the row's key goes (back) into the queue. SECURITY DEFINER: whoever writes the table may
-- not have rights on pgtraj's tables, and must not need them. The trigger's argument names the target;
-- a trigger naming a target of another table is refused, so no one can feed another table's queue.
CREATE OR REPLACE FUNCTION pgtraj._enqueue() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    t pgtraj.embedding_targets;
    k text;
BEGIN
    SELECT * INTO t FROM pgtraj.embedding_targets x WHERE x.name = TG_ARGV[0];
    IF NOT FOUND THEN
        RETURN NULL;  -- its target is gone (drop_embedding_target removes the triggers too)
    END IF;
    IF t.table_name::oid <> TG_RELID THEN
        RAISE EXCEPTION 'pgtraj: trigger % on % names embedding target %, which fills another table',
              quote_ident(TG_NAME), TG_RELID::regclass, quote_literal(TG_ARGV[0]) USING ERRCODE = '42501';
    END IF;
    EXECUTE format('SELECT ($1).%I::text', t.key_column) INTO k USING NEW;
    INSERT INTO pgtraj.embedding_queue AS q (target, key) VALUES (t.name, k)
    ON CONFLICT (target, key) DO UPDATE
        SET enqueued_at = now(), attempts = 0, next_attempt_at = now(), last_error = NULL;
    RETURN NULL;
END
$$;

-- A target's trigger on a Citus distributed table, which runs on the shards (on the workers, where the
-- queue is not): a changed trajectory clears its row's embedding and model version (the columns are its
-- arguments), so process_queue, which embeds the rows without a current embedding there, takes it again.
CREATE OR REPLACE FUNCTION pgtraj._clear_embedding() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pgtraj AS $$
BEGIN
    NEW := jsonb_populate_record(NEW, jsonb_build_object(TG_ARGV[0], NULL, TG_ARGV[1], NULL));
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION pgtraj._target(name text, caller name) RETURNS pgtraj.embedding_targets
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    t pgtraj.embedding_targets;
BEGIN
    SELECT * INTO t FROM pgtraj.embedding_targets x WHERE x.name = _target.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgtraj: no embedding target named %', quote_literal(name) USING ERRCODE = '42704',
              HINT = 'SELECT name FROM pgtraj.embedding_targets lists them';
    END IF;
    PERFORM pgtraj._check_column_rights(caller, t.table_name, t.key_column, t.traj_column, t.embedding_column);
    RETURN t;
END
$$;

-- pgtraj 0.2.0's, without the aspect
DROP FUNCTION IF EXISTS pgtraj._target_add(text, regclass, name, name, name, text, integer, integer, name);
CREATE OR REPLACE FUNCTION pgtraj._target_add(name text, source regclass, key_column name, traj_column name,
                                              embedding_column name, model text, batch_size integer,
                                              max_attempts integer, aspect text, caller name DEFAULT current_user)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    who name := pgtraj._acting_for(caller);
BEGIN
    PERFORM pgtraj._check_writable('create an embedding target');
    PERFORM pgtraj._check_column_rights(who, source, key_column, traj_column, embedding_column);
    IF NOT has_table_privilege(who, source, 'TRIGGER') THEN
        RAISE EXCEPTION 'pgtraj: role % may not create triggers on %', who, source USING ERRCODE = '42501',
              HINT = format('the table''s owner can GRANT TRIGGER ON %s TO %I', source, who);
    END IF;
    IF key_column IS DISTINCT FROM (pgtraj._primary_key(source)).name THEN
        RAISE EXCEPTION 'pgtraj: % is not the primary key of %', quote_ident(key_column), source USING ERRCODE = '42P10';
    END IF;
    INSERT INTO pgtraj.embedding_targets (name, table_name, key_column, traj_column, embedding_column, model,
                                          batch_size, max_attempts, aspect, created_by)
    VALUES (name, source, key_column, traj_column, embedding_column, model, batch_size, max_attempts, aspect, who);
END
$$;

-- Removing a target is for the table's owner (who alone can drop its triggers) or the target's creator.
CREATE OR REPLACE FUNCTION pgtraj._target_remove(name text, caller name DEFAULT current_user) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    who name := pgtraj._acting_for(caller);
    t   pgtraj.embedding_targets;
BEGIN
    SELECT * INTO t FROM pgtraj.embedding_targets x WHERE x.name = _target_remove.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgtraj: no embedding target named %', quote_literal(name) USING ERRCODE = '42704';
    END IF;
    IF t.created_by <> who AND NOT pg_has_role(who, (SELECT c.relowner FROM pg_class c WHERE c.oid = t.table_name),
                                               'MEMBER') THEN
        RAISE EXCEPTION 'pgtraj: only the owner of % or the creator of target % may drop it', t.table_name,
              quote_literal(name) USING ERRCODE = '42501';
    END IF;
    DELETE FROM pgtraj.embedding_targets x WHERE x.name = _target_remove.name;
END
$$;

CREATE OR REPLACE FUNCTION pgtraj._target_pause(name text, paused boolean, caller name DEFAULT current_user)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
BEGIN
    PERFORM pgtraj._target(name, pgtraj._acting_for(caller));
    UPDATE pgtraj.embedding_targets x SET paused = _target_pause.paused WHERE x.name = _target_pause.name;
END
$$;

-- The queue, for workers: keys in (backfill), due keys out (locked for this transaction, skipping those
-- another worker holds), and the outcome of a batch in one call.
CREATE OR REPLACE FUNCTION pgtraj._queue_add(target text, keys text[], caller name DEFAULT current_user) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM pgtraj._target(target, pgtraj._acting_for(caller));
    INSERT INTO pgtraj.embedding_queue (target, key) SELECT _queue_add.target, k FROM unnest(keys) AS u(k)
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION pgtraj._queue_take(target text, n integer, caller name DEFAULT current_user)
RETURNS TABLE (key text, attempts integer)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
BEGIN
    PERFORM pgtraj._target(target, pgtraj._acting_for(caller));
    RETURN QUERY SELECT q.key, q.attempts FROM pgtraj.embedding_queue q
                  WHERE q.target = _queue_take.target AND q.next_attempt_at <= now()
                  ORDER BY q.next_attempt_at, q.key LIMIT n FOR UPDATE SKIP LOCKED;
END
$$;

-- done: embedded, or gone from the table; retry: failed, to be tried again after a backoff of 10 s, 20 s,
-- 40 s, ... (at most an hour); dead: failed for the last time, moved to pgtraj.embedding_errors.
CREATE OR REPLACE FUNCTION pgtraj._queue_done(target text, model_id bigint, done_keys text[], retry_keys text[],
                                              retry_messages text[], dead_keys text[], dead_sqlstates text[],
                                              dead_messages text[], caller name DEFAULT current_user)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    who name := pgtraj._acting_for(caller);
    t   pgtraj.embedding_targets := pgtraj._target(target, who);
BEGIN
    UPDATE pgtraj.embedding_queue q
       SET attempts = q.attempts + 1, last_error = left(u.m, 4000),
           next_attempt_at = now() + make_interval(secs => least(3600, 10 * 2 ^ q.attempts))
      FROM unnest(retry_keys, retry_messages) AS u(k, m)
     WHERE q.target = t.name AND q.key = u.k;
    DELETE FROM pgtraj.embedding_queue q WHERE q.target = t.name AND (q.key = ANY (done_keys) OR q.key = ANY (dead_keys));
    PERFORM pgtraj._record_errors(t.table_name, t.embedding_column, model_id, done_keys, dead_keys, dead_sqlstates,
                                  dead_messages, t.max_attempts, who);
END
$$;

-- pgtraj 0.2.0's, without the aspect
DROP FUNCTION IF EXISTS pgtraj.create_embedding_target(text, regclass, name, name, text, integer, integer, boolean);
CREATE OR REPLACE FUNCTION pgtraj.create_embedding_target(name text, source regclass, traj_column name,
                                                          embedding_column name, model text,
                                                          batch_size integer DEFAULT 200,
                                                          max_attempts integer DEFAULT 5,
                                                          backfill boolean DEFAULT true,
                                                          aspect text DEFAULT 'route')
RETURNS bigint
LANGUAGE plpython3u VOLATILE STRICT SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
return pgtraj.queue.create_target(plpy, name, source, traj_column, embedding_column, model, batch_size, max_attempts,
                                  backfill, aspect)
$$;
COMMENT ON FUNCTION pgtraj.create_embedding_target(text, regclass, name, name, text, integer, integer, boolean, text) IS
    'Keeps a vector column embedded (aspect route or spacetime): triggers queue inserted rows and rows whose trajectory changed (returns the rows queued by backfill)';

CREATE OR REPLACE FUNCTION pgtraj.drop_embedding_target(name text) RETURNS void
LANGUAGE plpython3u VOLATILE STRICT SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
pgtraj.queue.drop_target(plpy, name)
$$;
COMMENT ON FUNCTION pgtraj.drop_embedding_target(text) IS 'Removes a target, its triggers and its queue (embeddings stay)';

CREATE OR REPLACE PROCEDURE pgtraj.process_queue(target text DEFAULT NULL, max_batches integer DEFAULT NULL)
LANGUAGE plpython3u AS $$
@BOOT@
pgtraj.queue.process_queue(plpy, target, max_batches)
$$;
COMMENT ON PROCEDURE pgtraj.process_queue(text, integer) IS
    'Embeds queued rows of a target (NULL: every target not paused that this role may fill), batch by batch; safe to run many at once';

CREATE OR REPLACE FUNCTION pgtraj.pause_embedding(name text) RETURNS void
LANGUAGE sql VOLATILE STRICT SET search_path = pg_catalog, pgtraj AS $$ SELECT pgtraj._target_pause(name, true) $$;
COMMENT ON FUNCTION pgtraj.pause_embedding(text) IS 'Workers skip this target (triggers still queue changes)';

CREATE OR REPLACE FUNCTION pgtraj.resume_embedding(name text) RETURNS void
LANGUAGE sql VOLATILE STRICT SET search_path = pg_catalog, pgtraj AS $$ SELECT pgtraj._target_pause(name, false) $$;
COMMENT ON FUNCTION pgtraj.resume_embedding(text) IS 'Workers take this target''s queue again';

-- pg_cron jobs of pgtraj (refresh here, training in 80_training.sql): scheduled by name, so that scheduling
-- again replaces the job, and pg_cron never runs two instances of one job at once. A job runs as the role
-- that scheduled it, and only pgtraj's own command: pg_cron's schema stays private, and nobody schedules
-- anything they could not run themselves. These helpers are owned by the installing superuser (pg_cron
-- lets only a superuser name the role a job runs as) and called only by the schedule functions below.
CREATE OR REPLACE FUNCTION pgtraj._cron_schedule(job text, schedule text, command text, who name, instead text)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pgtraj AS $$
BEGIN
    IF to_regnamespace('cron') IS NULL THEN
        RAISE EXCEPTION 'pgtraj: pg_cron is not enabled in this database' USING ERRCODE = '0A000',
              HINT = 'CREATE EXTENSION pg_cron in the database named by cron.database_name (pgtraj install does it'
                     ' when possible), or ' || instead || ' from any scheduler';
    END IF;
    PERFORM pgtraj._check_writable('schedule a job');
    RETURN cron.schedule_in_database(job, schedule, command, current_database(), who);
END
$$;

CREATE OR REPLACE FUNCTION pgtraj._cron_unschedule(job text, who name) RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    id   bigint;
    done boolean := false;
BEGIN
    IF to_regnamespace('cron') IS NULL THEN
        RETURN false;
    END IF;
    FOR id IN SELECT j.jobid FROM cron.job j JOIN pg_roles r ON r.rolname = j.username
               WHERE j.jobname = job AND j.database = current_database() AND pg_has_role(who, r.oid, 'MEMBER') LOOP
        PERFORM cron.unschedule(id);
        done := true;
    END LOOP;
    RETURN done;
END
$$;

-- One job per target, named pgtraj-refresh-<target>, run as the caller; SKIP LOCKED keeps even
-- hand-started workers apart.
CREATE OR REPLACE FUNCTION pgtraj._schedule_refresh(name text, schedule text, caller name DEFAULT current_user)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    who name := pgtraj._acting_for(caller);
BEGIN
    PERFORM pgtraj._target(name, who);
    RETURN pgtraj._cron_schedule('pgtraj-refresh-' || name, schedule, format('CALL pgtraj.process_queue(%L)', name),
                                 who, 'run CALL pgtraj.process_queue()');
END
$$;

CREATE OR REPLACE FUNCTION pgtraj._unschedule(job text, caller name DEFAULT current_user) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
BEGIN
    IF job !~ '^pgtraj-(refresh|train|embed)-' THEN
        RAISE EXCEPTION 'pgtraj: % is not a pgtraj job', quote_literal(job) USING ERRCODE = '42501';
    END IF;
    RETURN pgtraj._cron_unschedule(job, pgtraj._acting_for(caller));
END
$$;

CREATE OR REPLACE FUNCTION pgtraj.schedule_refresh(name text, schedule text DEFAULT '* * * * *') RETURNS bigint
LANGUAGE sql VOLATILE STRICT SET search_path = pg_catalog, pgtraj AS $$ SELECT pgtraj._schedule_refresh(name, schedule) $$;
COMMENT ON FUNCTION pgtraj.schedule_refresh(text, text) IS
    'Runs pgtraj.process_queue for a target on a pg_cron schedule (default every minute), as the calling role; returns the cron job id';

CREATE OR REPLACE FUNCTION pgtraj.unschedule_refresh(name text) RETURNS boolean
LANGUAGE sql VOLATILE STRICT SET search_path = pg_catalog, pgtraj AS $$ SELECT pgtraj._unschedule('pgtraj-refresh-' || name) $$;
COMMENT ON FUNCTION pgtraj.unschedule_refresh(text) IS 'Removes a target''s pg_cron job (false if there was none)';

-- What a person checks: per target, what waits, what is being retried, what failed, and the last run.
-- security_invoker: a role sees only the targets of tables it may read (the tables' row security).
CREATE OR REPLACE VIEW pgtraj.embedding_status WITH (security_invoker = true) AS
SELECT t.name, t.table_name, t.embedding_column, t.model, t.paused,
       -- on a Citus distributed table nothing is queued: its rows without a current embedding wait instead
       CASE WHEN pgtraj._citus_kind(t.table_name) = 'distributed' THEN NULL
            ELSE count(q.key) FILTER (WHERE q.attempts = 0) END AS pending,
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

-- A dropped table takes its targets and dead letters with it: a stored OID must never come to name a new
-- table. Errors here are reported, never allowed to block the DROP.
CREATE OR REPLACE FUNCTION pgtraj._forget_dropped() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
BEGIN
    DELETE FROM pgtraj.embedding_targets t USING pg_event_trigger_dropped_objects() d
     WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0 AND t.table_name::oid = d.objid;
    DELETE FROM pgtraj.embedding_errors e USING pg_event_trigger_dropped_objects() d
     WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0 AND e.table_name::oid = d.objid;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'pgtraj: could not forget the embedding targets of a dropped table: %', SQLERRM;
END
$$;
DROP EVENT TRIGGER IF EXISTS pgtraj_forget_dropped_tables;
CREATE EVENT TRIGGER pgtraj_forget_dropped_tables ON sql_drop EXECUTE FUNCTION pgtraj._forget_dropped();
