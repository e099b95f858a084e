-- pgtraj SQL API, part 8: training from SQL, on demand or on a pg_cron schedule.

-- One registration, used by every path that adds a model version from inside the database.
CREATE OR REPLACE FUNCTION pgtraj._register(name text, objective text, config jsonb, tokenizer jsonb, metrics jsonb,
                                            primary_metric text, higher_is_better boolean, embedding_dim integer,
                                            training_run_id bigint, description text, kinds text[], graphs bytea[])
RETURNS TABLE (model_id bigint, version integer)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    new_id  bigint;
    new_ver integer;
BEGIN
    IF cardinality(kinds) IS DISTINCT FROM cardinality(graphs) OR cardinality(kinds) = 0 THEN
        RAISE EXCEPTION 'pgtraj: a model version needs at least one graph, and one kind per graph'
              USING ERRCODE = '22023';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('pgtraj.register'), hashtext(_register.name));
    SELECT coalesce(max(r.version), 0) + 1 INTO new_ver FROM pgtraj.model_registry r WHERE r.name = _register.name;
    INSERT INTO pgtraj.model_registry (name, version, objective, config, tokenizer, metrics, primary_metric,
                                       higher_is_better, embedding_dim, training_run_id, description)
    VALUES (_register.name, new_ver, _register.objective, coalesce(_register.config, '{}'), _register.tokenizer,
            coalesce(_register.metrics, '{}'), _register.primary_metric, coalesce(_register.higher_is_better, true),
            _register.embedding_dim, _register.training_run_id, _register.description)
    RETURNING id INTO new_id;
    INSERT INTO pgtraj.model_artifacts (model_id, kind, bytes, sha256)
    SELECT new_id, k, g, encode(sha256(g), 'hex') FROM unnest(kinds, graphs) AS u(k, g);
    RETURN QUERY SELECT new_id, new_ver;
END
$$;
REVOKE ALL ON FUNCTION pgtraj._register(text, text, jsonb, jsonb, jsonb, text, boolean, integer, bigint, text, text[], bytea[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtraj._register(text, text, jsonb, jsonb, jsonb, text, boolean, integer, bigint, text, text[], bytea[])
    TO pgtraj_admin;

-- source: a table (columns from config: id_column (default: the primary key), traj_column (default: its
-- geometry/tgeompoint column), split_column (default 'split', values train/val/...)) or a query returning
-- (id, trajectory, split). config: TrainConfig fields (training/*.json). deploy: 'auto' (when better than
-- the deployed version on val_loss, or nothing is deployed), 'always', 'never'. Call it outside an explicit
-- transaction block: it commits as it goes.
CREATE OR REPLACE PROCEDURE pgtraj.train(name text, source text, objective text DEFAULT 'hybrid',
                                         config jsonb DEFAULT '{}', deploy text DEFAULT 'auto')
LANGUAGE plpython3u AS $$
@BOOT@
rt = GD['pgtraj']
rt.inference.call(plpy, rt.training.train, name, source, objective, config or '{}', deploy or 'auto')
$$;
COMMENT ON PROCEDURE pgtraj.train(text, text, text, jsonb, text) IS
    'Trains a model inside the database from a table or query, records the run, registers the version and deploys it if better (or always/never)';
REVOKE ALL ON PROCEDURE pgtraj.train(text, text, text, jsonb, text) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE pgtraj.train(text, text, text, jsonb, text) TO pgtraj_admin;

CREATE OR REPLACE FUNCTION pgtraj.schedule_training(name text, schedule text, source text,
                                                    objective text DEFAULT 'hybrid', config jsonb DEFAULT '{}',
                                                    deploy text DEFAULT 'auto')
RETURNS bigint
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT pgtraj._cron_schedule('pgtraj-train-' || name, schedule,
                                 format('CALL pgtraj.train(%L, %L, %L, %L::jsonb, %L)', name, source, objective, config,
                                        deploy), 'CALL pgtraj.train(...)')
$$;
COMMENT ON FUNCTION pgtraj.schedule_training(text, text, text, text, jsonb, text) IS
    'Retrains a model on a pg_cron schedule (job pgtraj-train-<name>); runs never overlap, failures leave the deployed model as it is';
REVOKE ALL ON FUNCTION pgtraj.schedule_training(text, text, text, text, jsonb, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtraj.schedule_training(text, text, text, text, jsonb, text) TO pgtraj_admin;

CREATE OR REPLACE FUNCTION pgtraj.unschedule_training(name text) RETURNS boolean
LANGUAGE sql VOLATILE STRICT AS $$ SELECT pgtraj._cron_unschedule('pgtraj-train-' || name) $$;
COMMENT ON FUNCTION pgtraj.unschedule_training(text) IS 'Removes a model''s training schedule (false if there was none)';
REVOKE ALL ON FUNCTION pgtraj.unschedule_training(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtraj.unschedule_training(text) TO pgtraj_admin;

CREATE OR REPLACE VIEW pgtraj.training_status AS
SELECT r.id, r.model_name, r.objective, r.source,
       CASE WHEN r.status = 'running' AND r.pid IS NOT NULL
                 AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = r.pid)
            THEN 'interrupted' ELSE r.status END AS status,
       r.outcome, r.error, (r.metrics ->> 'val_loss')::float8 AS val_loss, r.device, r.deploy_policy,
       r.started_by, r.started_at, r.finished_at
  FROM pgtraj.training_runs r;
COMMENT ON VIEW pgtraj.training_status IS 'Training runs (from SQL, pg_cron or clients) with what each did';
GRANT SELECT ON pgtraj.training_status TO pgtraj_user;
