-- pgtraj SQL API, part 9: who may do what. The only GRANTs of pgtraj: whatever is not granted here is
-- denied. The test suite reproduces each attack these rules stop (tests/test_security.py) and prints the
-- whole catalogue of rights (tests/sql/api.sql).

-- Every routine and type below prints fully qualified (regprocedure, and Citus' own text of these
-- statements): on a Citus coordinator they are sent to every worker, whose search_path is not this install's.
SET LOCAL search_path = pg_catalog;

REVOKE ALL ON SCHEMA pgtraj FROM PUBLIC;
GRANT USAGE ON SCHEMA pgtraj TO pgtraj_user, pgtraj_service;

-- Tables and views: read-only for everyone; row security hides targets, queues and failed rows of tables
-- a role may not read. Only pgtraj_service's functions write, each after checking its caller.
REVOKE ALL ON ALL TABLES IN SCHEMA pgtraj FROM PUBLIC, pgtraj_user, pgtraj_admin, pgtraj_service;
GRANT SELECT ON ALL TABLES IN SCHEMA pgtraj TO pgtraj_user, pgtraj_service;
GRANT INSERT, UPDATE, DELETE ON pgtraj.model_registry, pgtraj.model_artifacts, pgtraj.deployment_log,
                                pgtraj.training_runs, pgtraj.jobs, pgtraj.embedding_targets, pgtraj.embedding_queue,
                                pgtraj.embedding_errors, pgtraj.job_parts
    TO pgtraj_service;
-- a job's parts name keys of its table: only its own role reads them (pgtraj._parts_progress)
REVOKE SELECT ON pgtraj.job_parts FROM pgtraj_user;

-- Routines: nothing for PUBLIC, then by role. Internal functions a role may call are those the public
-- ones call with the caller's rights; each validates its arguments (digests are 64 hex digits, model ids
-- exist, tables are checked against the caller's privileges).
REVOKE ALL ON ALL ROUTINES IN SCHEMA pgtraj FROM PUBLIC, pgtraj_user, pgtraj_admin;

DO $$
DECLARE
    grants CONSTANT text[][] := ARRAY[
        -- using models, batch-embedding and keeping fresh the tables one may write
        ['pgtraj_user', 'runtime_info version line tokenize _tokenize _wkb _known_srid _model_doc _is_model_name _resolve _embed embed '
                        'similarity _predict_next predict_next _predict_destination predict_destination _predict_path '
                        '_predict_travel_time predict_travel_time _classify classify '
                        'predict_path _fill_gaps fill_gaps fill_gaps_detail _score score _warmup warmup export_model '
                        'embed_table _embed_node _embed_part _parts_plan _part_claim _part_update _parts_progress _schedule_parts _citus_kind _job_start _job_update _record_errors create_hnsw_index _primary_key similar similar_rows _search_setup '
                        '_enqueue _clear_embedding create_embedding_target drop_embedding_target process_queue pause_embedding '
                        'resume_embedding _target_add _target_remove _target_pause _queue_add _queue_take _queue_done '
                        'schedule_refresh _schedule_refresh unschedule_refresh _unschedule _check_writable describe_source make_trips _wkb_or_reason'],
        -- training, registering, importing and deploying models
        ['pgtraj_admin', '_register deploy _run_start _run_finish import_model import_onnx train '
                         'schedule_training _schedule_training unschedule_training'],
        -- what the SECURITY DEFINER functions owned by pgtraj_service call
        ['pgtraj_service', '_acting_for _check_writable _check_column_rights _target _record_errors _primary_key '
                           '_model_doc _citus_kind _check_graph _job_of']];
    r  text[];
    fn regprocedure;
BEGIN
    -- pgtraj_service keeps the rights of what it owns (the functions it runs as), loses all others
    FOR fn IN SELECT p.oid FROM pg_proc p WHERE p.pronamespace = 'pgtraj'::regnamespace
                                          AND p.proowner <> 'pgtraj_service'::regrole LOOP
        EXECUTE format('REVOKE ALL ON ROUTINE %s FROM pgtraj_service', fn);
    END LOOP;
    FOREACH r SLICE 1 IN ARRAY grants LOOP
        FOR fn IN SELECT p.oid FROM pg_proc p WHERE p.pronamespace = 'pgtraj'::regnamespace
                                              AND p.proname = ANY (string_to_array(r[2], ' ')) LOOP
            EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO %I', fn, r[1]);
        END LOOP;
    END LOOP;
    -- the bookkeeping writers run as pgtraj_service, never as the superuser that installed them; the
    -- schedulers stay with that superuser, as pg_cron lets only a superuser choose the role a job runs as
    FOR fn IN SELECT p.oid FROM pg_proc p WHERE p.pronamespace = 'pgtraj'::regnamespace AND p.proname = ANY (ARRAY[
                  '_register', 'deploy', '_run_start', '_run_finish', '_job_start', '_job_update', '_record_errors',
                  '_enqueue', '_target_add', '_target_remove', '_target_pause', '_queue_add', '_queue_take',
                  '_queue_done', '_forget_dropped', '_parts_plan', '_part_claim', '_part_update', '_parts_progress']) LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO pgtraj_service', fn);
    END LOOP;
END
$$;
