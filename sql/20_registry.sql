-- pgtraj SQL API, part 2: the model registry and deployments.

GRANT SELECT ON pgtraj.installation, pgtraj.model_registry, pgtraj.model_artifacts, pgtraj.deployment_log,
                pgtraj.training_runs, pgtraj.jobs, pgtraj.schema_migrations
    TO pgtraj_user;
GRANT INSERT, UPDATE, DELETE ON pgtraj.model_registry, pgtraj.model_artifacts, pgtraj.deployment_log,
                                pgtraj.training_runs, pgtraj.jobs
    TO pgtraj_admin;

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
       m.description, m.created_by, m.created_at
  FROM pgtraj.model_registry m
  LEFT JOIN pgtraj.deployments d ON d.name = m.name
  LEFT JOIN LATERAL (SELECT array_agg(x.kind ORDER BY x.kind) AS artifacts,
                            sum(octet_length(x.bytes)) AS artifact_bytes
                       FROM pgtraj.model_artifacts x WHERE x.model_id = m.id) a ON true;
COMMENT ON VIEW pgtraj.models IS 'Registered model versions with their metrics and whether each is deployed';

GRANT SELECT ON pgtraj.deployments, pgtraj.models TO pgtraj_user;

CREATE OR REPLACE FUNCTION pgtraj.deploy(model_name text, version text DEFAULT 'latest', note text DEFAULT NULL)
RETURNS SETOF pgtraj.deployments
LANGUAGE plpgsql VOLATILE AS $$  -- not STRICT: note may be NULL
DECLARE
    cur       pgtraj.deployment_log;
    restored  pgtraj.deployment_log;
    target    bigint;
    previous  bigint;
    strat     text;
    metric    text;
BEGIN
    IF deploy.model_name IS NULL OR deploy.version IS NULL THEN
        RAISE EXCEPTION 'pgtraj: deploy() needs a model name and a version, got NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
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

    IF strat = 'rollback' OR cur.model_id IS DISTINCT FROM target THEN
        INSERT INTO pgtraj.deployment_log (model_name, model_id, strategy, previous_id, note)
        VALUES (deploy.model_name, target, strat, previous, deploy.note);
    ELSE
        RAISE NOTICE 'pgtraj: model "%" version % is already deployed', deploy.model_name,
            (SELECT m.version FROM pgtraj.model_registry m WHERE m.id = target);
    END IF;
    RETURN QUERY SELECT * FROM pgtraj.deployments d WHERE d.name = deploy.model_name;
END
$$;
COMMENT ON FUNCTION pgtraj.deploy(text, text, text) IS
    'Deploys a model version: a number, ''latest'', ''best'' (by its primary metric) or ''rollback''';
REVOKE ALL ON FUNCTION pgtraj.deploy(text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtraj.deploy(text, text, text) TO pgtraj_admin;
