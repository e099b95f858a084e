-- pgtraj SQL API, part 5: batch embedding of whole tables, with its bookkeeping, and similarity search.

-- The bookkeeping of batch work, written only through these SECURITY DEFINER functions: a job row is
-- opened for a table column the caller may write, and only the backend that opened it updates it; failed
-- rows are recorded for a column the caller may write. Nobody can forge another role's jobs or errors,
-- or attach them to a table they cannot write.
CREATE OR REPLACE FUNCTION pgtraj._check_column_rights(caller name, source regclass, key_column name,
                                                       traj_column name, embedding_column name)
RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    col  name;
    priv text;
BEGIN
    FOR col, priv IN VALUES (key_column, 'SELECT'), (traj_column, 'SELECT'), (embedding_column, 'UPDATE') LOOP
        IF col IS NOT NULL AND NOT has_column_privilege(caller, source, col, priv) THEN
            RAISE EXCEPTION 'pgtraj: role % may not % %.%', caller, lower(priv), source, quote_ident(col)
                  USING ERRCODE = '42501',
                        HINT = format('GRANT %s (%I) ON %s TO %I', priv, col, source, caller);
        END IF;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION pgtraj._job_start(kind text, source regclass, embedding_column name, model text,
                                             model_id bigint, total bigint, details jsonb DEFAULT '{}',
                                             target text DEFAULT NULL, caller name DEFAULT current_user)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    who name := pgtraj._acting_for(caller);
    id  bigint;
BEGIN
    IF kind IS NULL OR kind NOT IN ('embed_table', 'refresh') THEN
        RAISE EXCEPTION 'pgtraj: unknown job kind %', quote_literal(kind) USING ERRCODE = '22023';
    END IF;
    PERFORM pgtraj._check_column_rights(who, source, NULL, NULL, embedding_column);
    IF target IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pgtraj.embedding_targets t WHERE t.name = target
                                             AND t.table_name = source AND t.embedding_column = _job_start.embedding_column) THEN
        RAISE EXCEPTION 'pgtraj: embedding target % does not fill %.%', quote_literal(target), source,
              quote_ident(embedding_column) USING ERRCODE = '22023';
    END IF;
    INSERT INTO pgtraj.jobs (kind, args, status, total, started_at, pid, created_by)
    VALUES (kind, coalesce(details, '{}') || jsonb_build_object('table', source::text, 'embedding_column', embedding_column,
                                                                'model', model, 'model_id', model_id, 'target', target),
            'running', total, now(), pg_backend_pid(), who)
    RETURNING jobs.id INTO id;
    RETURN id;
END
$$;

-- Progress of a running job (status NULL), or its end ('succeeded', 'failed', 'cancelled').
CREATE OR REPLACE FUNCTION pgtraj._job_update(job bigint, done bigint, progress jsonb, status text DEFAULT NULL,
                                              error text DEFAULT NULL, total bigint DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
BEGIN
    IF status IS NOT NULL AND status NOT IN ('succeeded', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'pgtraj: a job ends succeeded, failed or cancelled, not %', quote_literal(status)
              USING ERRCODE = '22023';
    END IF;
    UPDATE pgtraj.jobs j
       SET done = coalesce(_job_update.done, j.done), progress = coalesce(_job_update.progress, j.progress),
           total = coalesce(_job_update.total, j.total), status = coalesce(_job_update.status, j.status),
           error = coalesce(_job_update.error, j.error),
           finished_at = CASE WHEN _job_update.status IS NOT NULL THEN now() END
     WHERE j.id = job AND j.pid = pg_backend_pid() AND j.status = 'running';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgtraj: job % is not running in this session', job USING ERRCODE = '42501';
    END IF;
END
$$;

-- Failed rows of a column: the keys that worked leave pgtraj.embedding_errors, the failures are recorded
-- (attempts counted up by one, or set to `attempts` when the queue gives up on a row).
CREATE OR REPLACE FUNCTION pgtraj._record_errors(source regclass, embedding_column name, model_id bigint,
                                                 ok_keys text[], bad_keys text[], sqlstates text[], messages text[],
                                                 attempts integer DEFAULT NULL, caller name DEFAULT current_user)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
#variable_conflict use_column
DECLARE
    who name := pgtraj._acting_for(caller);
BEGIN
    PERFORM pgtraj._check_column_rights(who, source, NULL, NULL, _record_errors.embedding_column);
    IF cardinality(ok_keys) > 0 THEN
        DELETE FROM pgtraj.embedding_errors e
         WHERE e.table_name = source AND e.embedding_column = _record_errors.embedding_column AND e.key = ANY (ok_keys);
    END IF;
    IF cardinality(bad_keys) > 0 THEN
        INSERT INTO pgtraj.embedding_errors AS e (table_name, embedding_column, key, model_id, sqlstate, error, attempts)
        SELECT source, _record_errors.embedding_column, u.k, _record_errors.model_id, u.s, left(u.m, 4000),
               coalesce(_record_errors.attempts, 1)
          FROM unnest(bad_keys, sqlstates, messages) AS u(k, s, m)
        ON CONFLICT (table_name, embedding_column, key) DO UPDATE
           -- no function call here: Citus refuses them in DO UPDATE (this table is in its metadata there)
           SET attempts = coalesce(_record_errors.attempts, e.attempts + 1), last_failed_at = excluded.last_failed_at,
               sqlstate = excluded.sqlstate, error = excluded.error, model_id = excluded.model_id;
    END IF;
END
$$;

-- embed_table(..., workers => n): the stale keys of a job cut into parts, which n backends take one at a
-- time: first those of their own slot (0 the caller, 1..n-1 the pg_cron sessions), then, once every slot has
-- started, or PARTS_GRACE after the job began whatever is left, and at any time a part whose backend is gone
-- (taken over from its cursor). Only the job's own backend plans parts; only its role's sessions take them.
CREATE OR REPLACE FUNCTION pgtraj._parts_plan(job bigint, bounds text[], slots integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgtraj.jobs j WHERE j.id = job AND j.pid = pg_backend_pid() AND j.status = 'running') THEN
        RAISE EXCEPTION 'pgtraj: job % is not running in this session', job USING ERRCODE = '42501';
    ELSIF slots IS NULL OR slots < 1 OR slots > 64 THEN
        RAISE EXCEPTION 'pgtraj: workers must be 1 to 64, not %', slots USING ERRCODE = '22023';
    END IF;
    -- part i covers the keys above bounds[i] (none: from the first) up to bounds[i + 1] (none: to the last)
    INSERT INTO pgtraj.job_parts (job, part, slot, after_key, last_key)
    SELECT job, i - 1, (i - 1) % slots, CASE WHEN i > 1 THEN bounds[i - 1] END,
           CASE WHEN i <= cardinality(bounds) THEN bounds[i] END
      FROM generate_series(1, coalesce(cardinality(bounds), 0) + 1) AS i;
    RETURN coalesce(cardinality(bounds), 0) + 1;
END
$$;

-- The job a background session was started for, if it is still running and its role's: its args.
CREATE OR REPLACE FUNCTION pgtraj._job_of(job bigint, caller name) RETURNS pgtraj.jobs
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    j pgtraj.jobs;
BEGIN
    SELECT * INTO j FROM pgtraj.jobs x WHERE x.id = job;
    IF NOT FOUND OR j.created_by <> caller THEN
        RAISE EXCEPTION 'pgtraj: job % is not one of role %''s', job, caller USING ERRCODE = '42501';
    END IF;
    RETURN j;
END
$$;

-- A backend of the job takes its next part (none: nothing is left for it, or the job is over).
CREATE OR REPLACE FUNCTION pgtraj._part_claim(job bigint, slot integer, grace interval DEFAULT '30 s',
                                              caller name DEFAULT current_user)
RETURNS TABLE (part integer, after_key text, last_key text, cursor text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
#variable_conflict use_column
DECLARE
    j pgtraj.jobs := pgtraj._job_of(job, pgtraj._acting_for(caller));
    p pgtraj.job_parts;
BEGIN
    IF j.status <> 'running' OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = j.pid) THEN
        RETURN;
    END IF;
    SELECT * INTO p FROM pgtraj.job_parts x
     WHERE x.job = j.id
       AND ((x.status = 'pending'
             AND (x.slot = _part_claim.slot OR clock_timestamp() - j.started_at > grace
                  OR NOT EXISTS (SELECT 1 FROM pgtraj.job_parts o WHERE o.job = j.id GROUP BY o.slot
                                 HAVING bool_and(o.status = 'pending'))))
            OR (x.status = 'running' AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                                                      WHERE a.pid = x.pid AND (a.backend_start <= x.claimed_at
                                                             OR a.backend_start IS NULL))))
     ORDER BY x.slot = _part_claim.slot DESC, x.status = 'running' DESC, x.part
     LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE pgtraj.job_parts x SET status = 'running', pid = pg_backend_pid(), claimed_at = clock_timestamp(),
                                  holders = x.holders || pg_backend_pid()
     WHERE x.job = p.job AND x.part = p.part;
    RETURN QUERY SELECT p.part, p.after_key, p.last_key, p.cursor;
END
$$;

-- A committed batch of a part (or its end: status 'done' or 'failed' with the error), written only by the
-- backend that holds the part; false when the job is over (cancelled, failed elsewhere): stop there.
CREATE OR REPLACE FUNCTION pgtraj._part_update(job bigint, part integer, cursor text, embedded bigint, failed bigint,
                                               status text DEFAULT NULL, error text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
#variable_conflict use_column
BEGIN
    IF status IS NOT NULL AND status NOT IN ('done', 'failed') THEN
        RAISE EXCEPTION 'pgtraj: a part ends done or failed, not %', quote_literal(status) USING ERRCODE = '22023';
    END IF;
    UPDATE pgtraj.job_parts x
       SET cursor = coalesce(_part_update.cursor, x.cursor), embedded = x.embedded + coalesce(_part_update.embedded, 0),
           failed = x.failed + coalesce(_part_update.failed, 0),
           batches = x.batches + CASE WHEN _part_update.cursor IS NOT NULL THEN 1 ELSE 0 END,
           status = coalesce(_part_update.status, x.status), error = left(_part_update.error, 4000)
     WHERE x.job = _part_update.job AND x.part = _part_update.part AND x.pid = pg_backend_pid() AND x.status = 'running';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgtraj: part % of job % is not held by this session', part, job USING ERRCODE = '42501';
    END IF;
    RETURN EXISTS (SELECT 1 FROM pgtraj.jobs j WHERE j.id = _part_update.job AND j.status = 'running'
                      AND EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = j.pid));
END
$$;

-- Where a job's parts stand, for its own role: rows embedded and failed, parts by status, sessions that
-- took part, and the first error of a failed part.
CREATE OR REPLACE FUNCTION pgtraj._parts_progress(job bigint, caller name DEFAULT current_user,
                                                  OUT embedded bigint, OUT failed bigint, OUT batches bigint,
                                                  OUT open_parts integer, OUT failed_parts integer, OUT sessions integer,
                                                  OUT error text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
#variable_conflict use_column
DECLARE
    j pgtraj.jobs := pgtraj._job_of(job, pgtraj._acting_for(caller));
BEGIN
    SELECT coalesce(sum(p.embedded), 0), coalesce(sum(p.failed), 0), coalesce(sum(p.batches), 0),
           count(*) FILTER (WHERE p.status IN ('pending', 'running')), count(*) FILTER (WHERE p.status = 'failed'),
           (SELECT count(DISTINCT h) FROM pgtraj.job_parts o, unnest(o.holders) h WHERE o.job = j.id), (array_agg(p.error ORDER BY p.part) FILTER (WHERE p.status = 'failed'))[1]
      INTO embedded, failed, batches, open_parts, failed_parts, sessions, error
      FROM pgtraj.job_parts p WHERE p.job = j.id;
END
$$;

-- The pg_cron sessions of a job, pgtraj-embed-<job>-<slot>, running CALL pgtraj._embed_part(job, slot) as
-- the job's role: every second where pg_cron schedules by the second (1.5 on), else every minute; a run
-- that finds nothing left returns at once. The caller's backend unschedules them when the job ends (a
-- session that finds its job over unschedules itself: pgtraj._unschedule).
CREATE OR REPLACE FUNCTION pgtraj._schedule_parts(job bigint, caller name DEFAULT current_user) RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    j        pgtraj.jobs := pgtraj._job_of(job, pgtraj._acting_for(caller));
    slots    integer;
    schedule text := '* * * * *';
BEGIN
    IF j.pid <> pg_backend_pid() OR j.status <> 'running' THEN
        RAISE EXCEPTION 'pgtraj: job % is not running in this session', job USING ERRCODE = '42501';
    END IF;
    SELECT max(p.slot) INTO slots FROM pgtraj.job_parts p WHERE p.job = j.id;
    IF (SELECT string_to_array(split_part(e.extversion, '-', 1), '.')::int[] >= '{1,5}' FROM pg_extension e
         WHERE e.extname = 'pg_cron') THEN
        schedule := '1 seconds';
    END IF;
    FOR s IN 1..coalesce(slots, 0) LOOP
        PERFORM pgtraj._cron_schedule(format('pgtraj-embed-%s-%s', j.id, s), schedule,
                                      format('CALL pgtraj._embed_part(%s, %s)', j.id, s), j.created_by,
                                      'CALL pgtraj.embed_table without workers');
    END LOOP;
    RETURN coalesce(slots, 0);
END
$$;

-- pgtraj 0.2.0's, without aspect (a procedure is never a view's dependency: dropping it is safe)
DROP PROCEDURE IF EXISTS pgtraj.embed_table(regclass, name, name, text, integer);
-- pgtraj 0.4.0's, without workers
DROP PROCEDURE IF EXISTS pgtraj.embed_table(regclass, name, name, text, integer, text);
CREATE OR REPLACE PROCEDURE pgtraj.embed_table(source regclass, traj_column name, embedding_column name,
                                               model text, batch_size integer DEFAULT 500,
                                               aspect text DEFAULT 'route', workers integer DEFAULT 1)
LANGUAGE plpython3u AS $$
@BOOT@
pgtraj.batch.embed_table(plpy, source, traj_column, embedding_column, model, batch_size, aspect, workers)
$$;
COMMENT ON PROCEDURE pgtraj.embed_table(regclass, name, name, text, integer, text, integer) IS
    'Fills a vector column with a model''s embeddings of one aspect (route, spacetime), batch by batch (each committed), in this backend or with workers => n backends at once (n - 1 started by pg_cron as the caller): only rows with no embedding or one from another model version; unusable rows go to pgtraj.embedding_errors';

-- A pg_cron session of embed_table(..., workers => n): takes parts of the job until none is left for it.
CREATE OR REPLACE PROCEDURE pgtraj._embed_part(job bigint, slot integer)
LANGUAGE plpython3u AS $$
@BOOT@
pgtraj.batch.embed_parts(plpy, job, slot)
$$;

-- A round of embed_table on a Citus worker: batches of the shards of source that this node holds, from each
-- shard's cursor, each committed, for about `seconds` (runtime/batch.py, embed_node). It runs in a connection
-- the coordinator opens as the caller, so the shards' own grants apply; summary says what became of them.
CREATE OR REPLACE PROCEDURE pgtraj._embed_node(source text, traj_column name, embedding_column name, model text,
                                               batch_size integer, aspect text, cursors text, seconds float8,
                                               INOUT summary text DEFAULT NULL)
LANGUAGE plpython3u AS $$
@BOOT@
return {"summary": pgtraj.batch.embed_node(plpy, source, traj_column, embedding_column, model, batch_size, aspect,
                                          cursors, seconds)}
$$;

-- Jobs as people want to read them: a 'running' job whose backend is gone was interrupted.
CREATE OR REPLACE VIEW pgtraj.job_status AS
SELECT j.id, j.kind, j.args ->> 'table' AS "table", j.args ->> 'model' AS model,
       CASE WHEN j.status = 'running' AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = j.pid)
            THEN 'interrupted' ELSE j.status END AS status,
       j.done, j.total,
       round(100.0 * j.done / nullif(j.total, 0), 1) AS percent,
       (j.progress ->> 'failed')::bigint AS failed,
       (j.progress ->> 'rows_per_second')::float8 AS rows_per_second,
       j.started_at, j.finished_at, j.error, j.created_by
  FROM pgtraj.jobs j;
COMMENT ON VIEW pgtraj.job_status IS 'Batch jobs with progress; status interrupted = its backend ended while running';

-- similarity search ----------------------------------------------------------------------------------------

-- An HNSW index for cosine distance on a vector column, named <table>_<column>_hnsw. pgvector's defaults
-- (m 16, ef_construction 64) give recall@10 above 0.95 on trajectory embeddings (benchmarks/); raise
-- ef_construction for more recall at a slower build.
CREATE OR REPLACE FUNCTION pgtraj.create_hnsw_index(source regclass, embedding_column name, m integer DEFAULT 16,
                                                    ef_construction integer DEFAULT 64)
RETURNS regclass
LANGUAGE plpgsql VOLATILE STRICT SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    typ   text;
    oid   oid;
    dims  integer;
    rel   name;
    nsp   name;
    idx   name;
BEGIN
    SELECT format_type(a.atttypid, a.atttypmod), a.atttypid, a.atttypmod INTO typ, oid, dims
      FROM pg_attribute a WHERE a.attrelid = source AND a.attname = embedding_column AND NOT a.attisdropped;
    IF typ IS NULL THEN
        RAISE EXCEPTION 'pgtraj: column % of % does not exist', quote_literal(embedding_column), source
              USING ERRCODE = '42703';
    ELSIF oid <> '@extschema:vector@.vector'::regtype OR dims <= 0 THEN
        RAISE EXCEPTION 'pgtraj: %.% is %, an HNSW index needs vector(n)', source, embedding_column, typ
              USING ERRCODE = '42804',
                    HINT = format('ALTER TABLE %s ALTER COLUMN %I TYPE vector(<the model''s dimension>)',
                                  source, embedding_column);
    ELSIF m < 2 OR m > 100 OR ef_construction < 4 OR ef_construction > 1000 THEN
        RAISE EXCEPTION 'pgtraj: m must be 2..100 and ef_construction 4..1000 (got %, %)', m, ef_construction
              USING ERRCODE = '22023';
    END IF;
    SELECT c.relname, n.nspname INTO rel, nsp FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = source;
    idx := left(rel || '_' || embedding_column, 58) || '_hnsw';
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %s USING hnsw (%I @extschema:vector@.vector_cosine_ops)'
                   ' WITH (m = %s, ef_construction = %s)', idx, source, embedding_column, m, ef_construction);
    RETURN format('%I.%I', nsp, idx)::regclass;
END
$$;
COMMENT ON FUNCTION pgtraj.create_hnsw_index(regclass, name, integer, integer) IS
    'Creates (if missing) an HNSW cosine index on a vector column, named <table>_<column>_hnsw';

-- The column naming a table's rows (in search results, job keys, queues): its single-column primary key,
-- and that column's type as SQL. The one place pgtraj looks it up, from SQL and from the runtime.
CREATE OR REPLACE FUNCTION pgtraj._primary_key(source regclass, OUT name name, OUT type text)
LANGUAGE plpgsql STABLE STRICT SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    columns integer;
BEGIN
    SELECT i.indnatts INTO columns FROM pg_index i WHERE i.indrelid = source AND i.indisprimary;
    IF columns IS DISTINCT FROM 1 THEN
        RAISE EXCEPTION 'pgtraj: % needs a single-column primary key to name its rows (it has %)', source,
              CASE WHEN columns IS NULL THEN 'none' ELSE 'a composite one' END
              USING ERRCODE = '42P10',
                    HINT = format('ALTER TABLE %s ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY', source);
    END IF;
    SELECT a.attname, format_type(a.atttypid, a.atttypmod) INTO name, type
      FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
     WHERE i.indrelid = source AND i.indisprimary;
END
$$;

-- What a nearest-neighbour search checks and sets first: k and ef_search in range, the column there, and
-- pgvector's search settings for this transaction (hnsw.ef_search; for k above 1,000, the iterative scan
-- that keeps searching until k rows are found, in exact distance order).
CREATE OR REPLACE FUNCTION pgtraj._search_setup(source regclass, embedding_column name, k integer, ef_search integer)
RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    setting text;
BEGIN
    IF k IS NULL OR ef_search IS NULL OR k < 1 OR k > 10000 OR ef_search < 1 OR ef_search > 1000 THEN
        RAISE EXCEPTION 'pgtraj: k must be 1..10000 and ef_search 1..1000 (got %, %)', k, ef_search
              USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = source AND a.attname = embedding_column
                                                  AND NOT a.attisdropped) THEN
        RAISE EXCEPTION 'pgtraj: column % of % does not exist', quote_literal(embedding_column), source
              USING ERRCODE = '42703';
    END IF;
    PERFORM set_config('hnsw.ef_search', least(greatest(ef_search, k), 1000)::text, true);
    IF pgtraj._citus_kind(source) = 'distributed' THEN
        -- Citus sends the shards' searches to the workers with their own settings; only SET LOCAL
        -- (under propagate_set_commands = local) goes with them, for this transaction
        PERFORM set_config('citus.propagate_set_commands', 'local', true);
        FOREACH setting IN ARRAY ARRAY['hnsw.ef_search', 'hnsw.iterative_scan', 'hnsw.max_scan_tuples'] LOOP
            EXECUTE format('SET LOCAL %s = %L', setting, current_setting(setting));
        END LOOP;
    END IF;
    IF k > 1000 THEN
        PERFORM set_config('hnsw.iterative_scan', 'strict_order', true);
        PERFORM set_config('hnsw.max_scan_tuples', greatest(20000, 10 * k)::text, true);
    END IF;
END
$$;

-- The k rows nearest to a query embedding, by cosine distance, through the HNSW index when there is one.
-- ef_search (candidates kept while searching, pgvector's hnsw.ef_search, at most 1,000) trades speed for
-- recall; for k above it, pgvector's iterative scan keeps searching until k rows are found, in exact
-- distance order. Both are set for this transaction only, which is why the function is VOLATILE and
-- PARALLEL UNSAFE.
CREATE OR REPLACE FUNCTION pgtraj.similar(source regclass, embedding_column name, query vector, k integer DEFAULT 10,
                                          ef_search integer DEFAULT 100)
RETURNS TABLE (id text, distance double precision)
LANGUAGE plpgsql VOLATILE STRICT SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    key name;
BEGIN
    PERFORM pgtraj._search_setup(source, embedding_column, k, ef_search);
    key := (pgtraj._primary_key(source)).name;
    -- No "WHERE column IS NOT NULL" in the ordered scan: with statistics taken before the column was filled
    -- (embed_table, then no ANALYZE yet) the planner would count one such row and sort the whole table
    -- instead of using the HNSW index. The index holds no NULLs; a sort puts them last, filtered here.
    RETURN QUERY EXECUTE format('SELECT s.id, s.distance FROM (SELECT %I::text AS id,'
                                ' (%I OPERATOR(@extschema:vector@.<=>) $1)::float8 AS distance FROM %s'
                                ' ORDER BY %I OPERATOR(@extschema:vector@.<=>) $1 LIMIT $2) s'
                                ' WHERE s.distance IS NOT NULL',
                                key, embedding_column, source, embedding_column)
        USING query, k;
END
$$;
COMMENT ON FUNCTION pgtraj.similar(regclass, name, vector, integer, integer) IS
    'The k rows (primary key as text) nearest to a query embedding by cosine distance, through the HNSW index';

-- The same search, returning the table's own rows (every column, typed as the table has them): what a
-- caller joins or filters on without casting a text id back. The table is named by its row type, e.g.
-- pgtraj.similar_rows(NULL::geolife.trajectories, 'embedding', q, 5); the distance is embedding <=> q.
CREATE OR REPLACE FUNCTION pgtraj.similar_rows(source anyelement, embedding_column name, query vector,
                                               k integer DEFAULT 10, ef_search integer DEFAULT 100)
RETURNS SETOF anyelement
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    rel regclass;
BEGIN
    SELECT t.typrelid::regclass INTO rel FROM pg_type t JOIN pg_class c ON c.oid = t.typrelid
     WHERE t.oid = pg_typeof(source) AND c.relkind IN ('r', 'p', 'v', 'm', 'f');
    IF rel IS NULL THEN
        RAISE EXCEPTION 'pgtraj: similar_rows takes a table''s row type, not %', pg_typeof(source)
              USING ERRCODE = '42804', HINT = 'pass NULL::schema.table';
    END IF;
    PERFORM pgtraj._search_setup(rel, embedding_column, k, ef_search);
    -- ordered without an IS NOT NULL filter, as in similar() (why there), the NULLs dropped after the limit
    RETURN QUERY EXECUTE format('SELECT (s.r).* FROM (SELECT t AS r, t.%I OPERATOR(@extschema:vector@.<=>) $1 AS d'
                                ' FROM %s t ORDER BY t.%I OPERATOR(@extschema:vector@.<=>) $1 LIMIT $2) s'
                                ' WHERE s.d IS NOT NULL',
                                embedding_column, rel, embedding_column)
        USING query, k;
END
$$;
COMMENT ON FUNCTION pgtraj.similar_rows(anyelement, name, vector, integer, integer) IS
    'The k rows nearest to a query embedding, as the table''s own typed rows (pass NULL::table), through the HNSW index';

CREATE OR REPLACE FUNCTION pgtraj.similar_rows(source anyelement, embedding_column name, query geometry, model text,
                                               k integer DEFAULT 10, ef_search integer DEFAULT 100)
RETURNS SETOF anyelement
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pgtraj AS $$
    SELECT * FROM pgtraj.similar_rows(source, embedding_column, pgtraj.embed(query, model), k, ef_search)
$$;
COMMENT ON FUNCTION pgtraj.similar_rows(anyelement, name, geometry, text, integer, integer) IS
    'The k rows most similar to a trajectory, as the table''s own typed rows: embeds it with the model, then searches';

CREATE OR REPLACE FUNCTION pgtraj.similar(source regclass, embedding_column name, query geometry, model text,
                                          k integer DEFAULT 10, ef_search integer DEFAULT 100)
RETURNS TABLE (id text, distance double precision)
LANGUAGE sql VOLATILE STRICT SET search_path = pg_catalog, pgtraj AS $$
    SELECT * FROM pgtraj.similar(source, embedding_column, pgtraj.embed(query, model), k, ef_search)
$$;
COMMENT ON FUNCTION pgtraj.similar(regclass, name, geometry, text, integer, integer) IS
    'The k rows most similar to a trajectory: embeds it with the model, then searches the column';

CREATE OR REPLACE FUNCTION pgtraj.similar(source regclass, embedding_column name, row_id bigint, k integer DEFAULT 10,
                                          ef_search integer DEFAULT 100)
RETURNS TABLE (id text, distance double precision)
LANGUAGE plpgsql VOLATILE STRICT SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    key name;
    q   @extschema:vector@.vector;
BEGIN
    IF k < 1 OR k > 10000 THEN
        RAISE EXCEPTION 'pgtraj: k must be 1..10000 (got %)', k USING ERRCODE = '22023';
    END IF;
    key := (pgtraj._primary_key(source)).name;
    EXECUTE format('SELECT %I FROM %s WHERE %I = $1', embedding_column, source, key) INTO q USING row_id;
    IF q IS NULL THEN
        RAISE EXCEPTION 'pgtraj: % has no row % with an embedding in %', source, row_id, embedding_column
              USING ERRCODE = 'no_data_found', HINT = 'CALL pgtraj.embed_table(...) fills the column';
    END IF;
    -- one extra: the row itself comes back first, at distance 0
    RETURN QUERY SELECT s.id, s.distance FROM pgtraj.similar(source, embedding_column, q, k + 1, ef_search) s
                  WHERE s.id <> row_id::text LIMIT k;
END
$$;
COMMENT ON FUNCTION pgtraj.similar(regclass, name, bigint, integer, integer) IS
    'The k rows most similar to the row with this primary key, row_id (itself excluded)';
