-- pgtraj SQL API, part 8: training from SQL, on demand or on a pg_cron schedule.

-- source: a table or a query, in any shape pgtraj.describe_source recognises (LINESTRING M, tgeompoint or
-- one row per fix), read with the caller's rights; its columns are found by type and usual names, or named in
-- config as the CLI's flags spell them (id_column, traj_column, time_column, lat_column, lon_column,
-- entity_column, split_column, label_column). Without a split column the run makes its splits (config
-- split_by: 'time' or 'entity') and records them. config: TrainConfig fields (training/*.json), with
-- "cleaning": {"profile": ..., "max_discard": ...}.
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

-- How pgtraj reads a table or a query for training: its shape, the column of each role and the SQL of its
-- rows (entity, id, w, reason, split, label). `pgtraj train` runs that SQL on the client; CALL pgtraj.train
-- in the server. A table is passed as regclass (resolved with the caller's search_path), a query as text.
CREATE OR REPLACE FUNCTION pgtraj.describe_source(source regclass, options jsonb DEFAULT '{}') RETURNS jsonb
LANGUAGE plpython3u STABLE PARALLEL UNSAFE SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
import json
return json.dumps(pgtraj.sources.describe(plpy, source, json.loads(options or '{}')))
$$;
COMMENT ON FUNCTION pgtraj.describe_source(regclass, jsonb) IS
    'How training reads a table: its shape (line, temporal, points), the column of each role, the rows it has and the SQL that reads them';

-- A query names tables as its caller would: it runs under the caller's search_path (the default argument is
-- evaluated by the caller), restored when the function returns; the SQL this function writes is qualified.
CREATE OR REPLACE FUNCTION pgtraj.describe_source(query text, options jsonb DEFAULT '{}',
                                                  search_path text DEFAULT pg_catalog.current_setting('search_path'))
RETURNS jsonb
LANGUAGE plpython3u STABLE PARALLEL UNSAFE SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
import json
if not pgtraj.sources.is_query(query):
    raise pgtraj.sources.InferenceError("%r is not a query" % (query[:60],), sqlstate="22023",
                                        hint="pass a table as regclass: pgtraj.describe_source('%s'::regclass)" % query[:60])
plpy.execute(plpy.prepare("SELECT pg_catalog.set_config('search_path', $1, true)", ["text"]), [search_path])
return json.dumps(pgtraj.sources.describe(plpy, query, json.loads(options or '{}')))
$$;
COMMENT ON FUNCTION pgtraj.describe_source(text, jsonb, text) IS
    'How training reads a query (SELECT/WITH ...): its shape, the column of each role and the SQL that reads its rows';

-- Any source describe_source reads (one row per fix above all) as a table of trips, one LINESTRING M each, cut
-- where the fixes pause and cleaned as training cleans (options: the source's columns and "cleaning"); what
-- embed_table, similar and predict_* take as they are. With the caller's rights; target resolved and quoted
-- as the caller names tables.
CREATE OR REPLACE PROCEDURE pgtraj.make_trips(source text, target text, options jsonb DEFAULT '{}',
                                              replace boolean DEFAULT false)
LANGUAGE plpython3u AS $$
@BOOT@
pgtraj.trips.make_trips(plpy, source, target, options or '{}', bool(replace))
$$;
COMMENT ON PROCEDURE pgtraj.make_trips(text, text, jsonb, boolean) IS
    'Builds a table of trips (trip_id, the source id, part, start_at, end_at, fixes, LINESTRING M geom) from a table or query of fixes, lines or tgeompoints, cleaned';

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
