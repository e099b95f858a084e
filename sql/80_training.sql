-- pgtraj SQL API, part 8: training from SQL, on demand or on a pg_cron schedule.

-- source: a table (columns from config, spelt as the CLI's flags and app.training's arguments: id_column
-- (default: the primary key), traj_column (default: its geometry/tgeompoint column), split_column (default
-- 'split', values train/val/...), label_column (the per-trajectory label of the classify objective)) or a
-- query returning (id, trajectory, split[, label]), read with the caller's rights. config: TrainConfig
-- fields (training/*.json).
-- deploy: 'auto' (when better than the deployed version on val_loss, or nothing is deployed), 'always',
-- 'never'. Call it outside an explicit transaction block: it commits as it goes.
CREATE OR REPLACE PROCEDURE pgtraj.train(name text, source text, objective text DEFAULT 'hybrid',
                                         config jsonb DEFAULT '{}', deploy text DEFAULT 'auto')
LANGUAGE plpython3u AS $$
@BOOT@
pgtraj.training.train(plpy, name, source, objective, config or '{}', deploy or 'auto')
$$;
COMMENT ON PROCEDURE pgtraj.train(text, text, text, jsonb, text) IS
    'Trains a model inside the database from a table or query, records the run, registers the version and deploys it if better (or always/never)';

CREATE OR REPLACE FUNCTION pgtraj._schedule_training(name text, schedule text, source text, objective text,
                                                     config jsonb, deploy text, caller name DEFAULT current_user)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    who name := pgtraj._acting_for(caller);
BEGIN
    IF NOT pg_has_role(who, 'pgtraj_admin', 'MEMBER') THEN
        RAISE EXCEPTION 'pgtraj: role % may not train models', who USING ERRCODE = '42501',
              HINT = 'GRANT pgtraj_admin TO ' || quote_ident(who);
    END IF;
    IF NOT pgtraj._is_model_name(name) THEN
        RAISE EXCEPTION 'pgtraj: invalid model name %', quote_literal(name) USING ERRCODE = '22023';
    END IF;
    RETURN pgtraj._cron_schedule('pgtraj-train-' || name, schedule,
                                 format('CALL pgtraj.train(%L, %L, %L, %L::jsonb, %L)', name, source, objective, config,
                                        deploy), who, 'CALL pgtraj.train(...)');
END
$$;

CREATE OR REPLACE FUNCTION pgtraj.schedule_training(name text, schedule text, source text,
                                                    objective text DEFAULT 'hybrid', config jsonb DEFAULT '{}',
                                                    deploy text DEFAULT 'auto')
RETURNS bigint
LANGUAGE sql VOLATILE STRICT SET search_path = pg_catalog, pgtraj AS $$
    SELECT pgtraj._schedule_training(name, schedule, source, objective, config, deploy)
$$;
COMMENT ON FUNCTION pgtraj.schedule_training(text, text, text, text, jsonb, text) IS
    'Retrains a model on a pg_cron schedule (job pgtraj-train-<name>, run as the calling role); runs never overlap, failures leave the deployed model as it is';

CREATE OR REPLACE FUNCTION pgtraj.unschedule_training(name text) RETURNS boolean
LANGUAGE sql VOLATILE STRICT SET search_path = pg_catalog, pgtraj AS $$ SELECT pgtraj._unschedule('pgtraj-train-' || name) $$;
COMMENT ON FUNCTION pgtraj.unschedule_training(text) IS 'Removes a model''s training schedule (false if there was none)';

CREATE OR REPLACE VIEW pgtraj.training_status AS
SELECT r.id, r.model_name, r.objective, r.source,
       CASE WHEN r.status = 'running' AND r.pid IS NOT NULL
                 AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = r.pid)
            THEN 'interrupted' ELSE r.status END AS status,
       r.outcome, r.error, (r.metrics ->> 'val_loss')::float8 AS val_loss, r.device, r.deploy_policy,
       r.started_by, r.started_at, r.finished_at
  FROM pgtraj.training_runs r;
COMMENT ON VIEW pgtraj.training_status IS 'Training runs (from SQL, pg_cron or clients) with what each did';

-- A trajectory's WKB, or why PostGIS or MobilityDB could not produce it: training reads every row of its
-- source, and one that cannot be converted is counted as rejected by reason instead of ending the run.
CREATE OR REPLACE FUNCTION pgtraj._wkb_or_reason(traj geometry, OUT w bytea, OUT reason text)
LANGUAGE plpgsql STABLE PARALLEL UNSAFE SET search_path = pg_catalog, pgtraj AS $$
BEGIN
    w := pgtraj._wkb(traj);
EXCEPTION WHEN OTHERS THEN  -- never a cancel: OTHERS does not cover query_canceled
    reason := SQLERRM;
END
$$;

CREATE OR REPLACE FUNCTION pgtraj._wkb_or_reason(traj tgeompoint, OUT w bytea, OUT reason text)
LANGUAGE plpgsql STABLE PARALLEL UNSAFE SET search_path = pg_catalog, pgtraj AS $$
BEGIN
    w := pgtraj._wkb(traj);
EXCEPTION WHEN OTHERS THEN
    reason := SQLERRM;
END
$$;
