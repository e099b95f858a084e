-- pgtraj SQL API, part 2: the model registry, deployments and training runs.
--
-- Writes go through three SECURITY DEFINER functions only: _register (the one INSERT path of a model
-- version, used by the Python client, CALL pgtraj.train, import_model and import_onnx), deploy, and the
-- training-run pair _run_start/_run_finish. Every graph is checked as it is stored (the check_artifact
-- trigger, 40_inference.sql): it loads in onnxruntime, fits its kind, reads no external data file and uses
-- no custom operator, because whoever serves it later (a superuser's query, pg_cron) runs it inside the
-- server.

-- What a model may be called: the registry's CHECK constraint (migrations/0001) in a function that messages
-- and lookups can share; core.contract.MODEL_NAME says the same for Python.
CREATE OR REPLACE FUNCTION pgtraj._is_model_name(name text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT name ~ '^[A-Za-z][A-Za-z0-9_.-]{0,62}$'
$$;

-- The live model of each name.
CREATE OR REPLACE VIEW pgtraj.deployments AS
SELECT DISTINCT ON (d.model_name)
       d.model_name AS name, m.version, d.model_id, d.strategy, d.deployed_at, d.deployed_by, d.note
  FROM pgtraj.deployment_log d
  JOIN pgtraj.model_registry m ON m.id = d.model_id
 ORDER BY d.model_name, d.id DESC;
COMMENT ON VIEW pgtraj.deployments IS 'The deployed (live) version of each model name';

-- Every registered version, without its ONNX bytes.
CREATE OR REPLACE VIEW pgtraj.models AS
SELECT m.id, m.name, m.version, m.objective, m.embedding_dim,
       m.primary_metric, (m.metrics ->> m.primary_metric)::float8 AS primary_metric_value,
       coalesce(d.model_id = m.id, false) AS deployed,
       a.artifacts, a.artifact_bytes, m.metrics, m.config, m.training_run_id,
       m.description, m.created_by, m.created_at,
       -- the tokenizer: H3 resolution, how many cells its vocabulary knows, and whose clock its time features read
       (m.tokenizer -> 'config' ->> 'resolution')::int AS resolution,
       jsonb_array_length(m.tokenizer -> 'vocab') AS vocabulary_cells,
       m.tokenizer -> 'config' ->> 'timezone' AS timezone
  FROM pgtraj.model_registry m
  LEFT JOIN pgtraj.deployments d ON d.name = m.name
  LEFT JOIN LATERAL (SELECT array_agg(x.kind ORDER BY x.kind) AS artifacts,
                            sum(octet_length(x.bytes)) AS artifact_bytes
                       FROM pgtraj.model_artifacts x WHERE x.model_id = m.id) a ON true;
COMMENT ON VIEW pgtraj.models IS 'Registered model versions with their metrics, embedding width, tokenizer and whether each is deployed';

CREATE OR REPLACE FUNCTION pgtraj._register(name text, objective text, config jsonb, tokenizer jsonb, metrics jsonb,
                                            primary_metric text, higher_is_better boolean, embedding_dim integer,
                                            training_run_id bigint, description text, kinds text[], graphs bytea[],
                                            caller name DEFAULT current_user)
RETURNS TABLE (model_id bigint, version integer)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
#variable_conflict use_column
DECLARE
    who     name := pgtraj._acting_for(caller);
    new_id  bigint;
    new_ver integer;
BEGIN
    PERFORM pgtraj._check_writable('register a model');
    IF _register.name IS NULL OR _register.objective IS NULL OR _register.tokenizer IS NULL THEN
        RAISE EXCEPTION 'pgtraj: a model version needs a name, an objective and a tokenizer' USING ERRCODE = '22004';
    END IF;
    IF coalesce(cardinality(kinds), 0) = 0 OR cardinality(kinds) IS DISTINCT FROM cardinality(graphs)
       OR array_position(kinds, NULL) IS NOT NULL OR array_position(graphs, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'pgtraj: a model version needs at least one graph, and one kind per graph' USING ERRCODE = '22023';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('pgtraj.register'), hashtext(_register.name));
    SELECT coalesce(max(r.version), 0) + 1 INTO new_ver FROM pgtraj.model_registry r WHERE r.name = _register.name;
    INSERT INTO pgtraj.model_registry (name, version, objective, config, tokenizer, metrics, primary_metric,
                                       higher_is_better, embedding_dim, training_run_id, description, created_by)
    VALUES (_register.name, new_ver, _register.objective, coalesce(_register.config, '{}'), _register.tokenizer,
            coalesce(_register.metrics, '{}'), _register.primary_metric, coalesce(_register.higher_is_better, true),
            _register.embedding_dim, _register.training_run_id, _register.description, who)
    RETURNING id INTO new_id;
    IF pgtraj._citus_kind('pgtraj.model_artifacts') = 'reference' THEN  -- no trigger there (40_inference.sql)
        PERFORM pgtraj._check_graph(new_id, k, encode(sha256(g), 'hex'), g) FROM unnest(kinds, graphs) AS u(k, g);
    END IF;
    INSERT INTO pgtraj.model_artifacts (model_id, kind, format, bytes, sha256)  -- elsewhere: checked by its trigger
    SELECT new_id, k, CASE k WHEN 'weights' THEN 'npz' ELSE 'onnx' END, g, encode(sha256(g), 'hex')
      FROM unnest(kinds, graphs) AS u(k, g);
    RETURN QUERY SELECT new_id, new_ver;
END
$$;
COMMENT ON FUNCTION pgtraj._register(text, text, jsonb, jsonb, jsonb, text, boolean, integer, bigint, text, text[], bytea[], name) IS
    'The one way a model version enters the registry: graphs checked, version numbered under a lock';

CREATE OR REPLACE FUNCTION pgtraj.deploy(model_name text, version text DEFAULT 'latest', note text DEFAULT NULL,
                                         caller name DEFAULT current_user)
RETURNS SETOF pgtraj.deployments
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$  -- not STRICT: note may be NULL
DECLARE
    who       name := pgtraj._acting_for(caller);
    cur       pgtraj.deployment_log;
    restored  pgtraj.deployment_log;
    target    bigint;
    previous  bigint;
    strat     text;
    metric    text;
    dim       integer;
    feeds     record;
BEGIN
    IF deploy.model_name IS NULL OR deploy.version IS NULL THEN
        RAISE EXCEPTION 'pgtraj: deploy() needs a model name and a version, got NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM pgtraj._check_writable('deploy a model');
    -- one deployment of a name at a time, so history stays a chain
    PERFORM pg_advisory_xact_lock(hashtext('pgtraj.deploy'), hashtext(deploy.model_name));
    IF NOT EXISTS (SELECT 1 FROM pgtraj.model_registry m WHERE m.name = deploy.model_name) THEN
        RAISE EXCEPTION 'pgtraj: no model named "%"', deploy.model_name
            USING ERRCODE = 'undefined_object',
                  HINT = 'SELECT name, version FROM pgtraj.models lists the registered models';
    END IF;
    SELECT * INTO cur FROM pgtraj.deployment_log d
     WHERE d.model_name = deploy.model_name ORDER BY d.id DESC LIMIT 1;
    previous := cur.id;

    IF deploy.version = 'latest' THEN
        strat := 'latest';
        SELECT m.id INTO target FROM pgtraj.model_registry m
         WHERE m.name = deploy.model_name ORDER BY m.version DESC LIMIT 1;
    ELSIF deploy.version = 'best' THEN
        strat := 'best';
        -- compare on the primary metric of the newest version that declares one
        SELECT m.primary_metric INTO metric FROM pgtraj.model_registry m
         WHERE m.name = deploy.model_name AND m.primary_metric IS NOT NULL ORDER BY m.version DESC LIMIT 1;
        IF metric IS NULL THEN
            RAISE EXCEPTION 'pgtraj: no version of model "%" declares a primary metric', deploy.model_name
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'deploy a version number instead, or register versions with primary_metric';
        END IF;
        SELECT m.id INTO target FROM pgtraj.model_registry m
         WHERE m.name = deploy.model_name AND m.metrics ? metric
         ORDER BY CASE WHEN m.higher_is_better THEN -(m.metrics ->> metric)::float8
                       ELSE (m.metrics ->> metric)::float8 END,
                  m.version DESC
         LIMIT 1;
    ELSIF deploy.version = 'rollback' THEN
        strat := 'rollback';
        IF cur.previous_id IS NULL THEN
            RAISE EXCEPTION 'pgtraj: model "%" has no earlier deployment to roll back to', deploy.model_name
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'SELECT * FROM pgtraj.deployment_log shows the deployment history';
        END IF;
        SELECT * INTO restored FROM pgtraj.deployment_log d WHERE d.id = cur.previous_id;
        target := restored.model_id;
        previous := restored.previous_id;  -- the next rollback goes further back, not forward again
    ELSIF deploy.version ~ '^[0-9]{1,9}$' THEN
        strat := 'version';
        SELECT m.id INTO target FROM pgtraj.model_registry m
         WHERE m.name = deploy.model_name AND m.version = deploy.version::int;
        IF target IS NULL THEN
            RAISE EXCEPTION 'pgtraj: model "%" has no version %', deploy.model_name, deploy.version
                USING ERRCODE = 'undefined_object',
                      DETAIL = format('registered versions: %s', (SELECT string_agg(m.version::text, ', ' ORDER BY m.version)
                                          FROM pgtraj.model_registry m WHERE m.name = deploy.model_name));
        END IF;
    ELSE
        RAISE EXCEPTION 'pgtraj: invalid version "%" for deploy()', deploy.version
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'use a version number, ''latest'', ''best'' or ''rollback''';
    END IF;

    -- embedding targets that follow this name keep a vector column filled: a version of another width
    -- would fail every row of a vector(n) column, and leave a plain vector column with mixed widths
    SELECT m.embedding_dim INTO dim FROM pgtraj.model_registry m WHERE m.id = target;
    FOR feeds IN SELECT t.name, t.table_name, t.embedding_column, a.atttypmod AS width
                   FROM pgtraj.embedding_targets t
                   JOIN pg_attribute a ON a.attrelid = t.table_name AND a.attname = t.embedding_column
                  WHERE t.model = deploy.model_name AND dim IS NOT NULL LOOP
        IF feeds.width > 0 AND feeds.width <> dim THEN
            RAISE EXCEPTION 'pgtraj: model "%" version % embeds in % dimensions, but embedding target % fills %.% (vector(%))',
                  deploy.model_name, (SELECT m.version FROM pgtraj.model_registry m WHERE m.id = target), dim,
                  feeds.name, feeds.table_name, quote_ident(feeds.embedding_column), feeds.width
                  USING ERRCODE = '42804',
                        HINT = format('first ALTER TABLE %s ALTER COLUMN %I TYPE vector(%s) USING NULL, or drop the target: SELECT pgtraj.drop_embedding_target(%L)',
                                      feeds.table_name, feeds.embedding_column, dim, feeds.name);
        ELSIF feeds.width <= 0 AND EXISTS (SELECT 1 FROM pgtraj.model_registry m
                                            WHERE m.id = cur.model_id AND m.embedding_dim IS DISTINCT FROM dim) THEN
            RAISE WARNING 'pgtraj: model "%" changes width to % dimensions; %.% keeps embeddings of the old width until re-embedded',
                  deploy.model_name, dim, feeds.table_name, quote_ident(feeds.embedding_column)
                  USING HINT = format('CALL pgtraj.embed_table(%L, ''<trajectory column>'', %L, %L) redoes them',
                                      feeds.table_name::text, feeds.embedding_column, deploy.model_name);
        END IF;
    END LOOP;

    IF strat = 'rollback' OR cur.model_id IS DISTINCT FROM target THEN
        INSERT INTO pgtraj.deployment_log (model_name, model_id, strategy, previous_id, note, deployed_by)
        VALUES (deploy.model_name, target, strat, previous, deploy.note, who);
    ELSE
        RAISE NOTICE 'pgtraj: model "%" version % is already deployed', deploy.model_name,
            (SELECT m.version FROM pgtraj.model_registry m WHERE m.id = target);
    END IF;
    RETURN QUERY SELECT * FROM pgtraj.deployments d WHERE d.name = deploy.model_name;
END
$$;
COMMENT ON FUNCTION pgtraj.deploy(text, text, text, name) IS
    'Deploys a model version: a number, ''latest'', ''best'' (by its primary metric) or ''rollback''';

-- A training run is opened by the backend that trains (from SQL or from a client) and closed by it alone.
CREATE OR REPLACE FUNCTION pgtraj._run_start(model_name text, source text, objective text, config jsonb,
                                             deploy_policy text DEFAULT NULL, caller name DEFAULT current_user)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    who name := pgtraj._acting_for(caller);
    id  bigint;
BEGIN
    PERFORM pgtraj._check_writable('train a model');
    INSERT INTO pgtraj.training_runs (model_name, source, objective, config, pid, deploy_policy, started_by)
    VALUES (model_name, source, objective, coalesce(config, '{}'), pg_backend_pid(), deploy_policy, who)
    RETURNING training_runs.id INTO id;
    RETURN id;
END
$$;

CREATE OR REPLACE FUNCTION pgtraj._run_finish(run_id bigint, status text, error text, metrics jsonb, outcome text,
                                              device text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
BEGIN
    UPDATE pgtraj.training_runs r
       SET status = _run_finish.status, finished_at = now(), error = _run_finish.error,
           metrics = coalesce(_run_finish.metrics, r.metrics), outcome = _run_finish.outcome,
           device = coalesce(_run_finish.device, r.device)
     WHERE r.id = run_id AND r.pid = pg_backend_pid() AND r.status = 'running';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgtraj: training run % is not running in this session', run_id USING ERRCODE = '42501';
    END IF;
END
$$;
