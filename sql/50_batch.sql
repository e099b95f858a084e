-- pgtraj SQL API, part 5: batch embedding of whole tables, with its bookkeeping.

GRANT SELECT, INSERT, UPDATE ON pgtraj.jobs TO pgtraj_user;
GRANT SELECT, INSERT, UPDATE, DELETE ON pgtraj.embedding_errors TO pgtraj_user;

CREATE OR REPLACE PROCEDURE pgtraj.embed_table(source regclass, traj_column name, embedding_column name,
                                               model text, batch_size integer DEFAULT 500)
LANGUAGE plpython3u AS $$
@BOOT@
rt = GD['pgtraj']
threads = plpy.execute("SELECT current_setting('pgtraj.threads', true) AS t")[0]["t"]
rt.inference.call(plpy, rt.batch.embed_table, source, traj_column, embedding_column, model, batch_size, threads)
$$;
COMMENT ON PROCEDURE pgtraj.embed_table(regclass, name, name, text, integer) IS
    'Fills a vector column with a model''s embeddings, batch by batch (each committed): only rows with no embedding or one from another model version; unusable rows go to pgtraj.embedding_errors';

-- Jobs as people want to read them: a 'running' job whose backend is gone was interrupted.
CREATE OR REPLACE VIEW pgtraj.job_status AS
SELECT j.id, j.kind, j.args ->> 'table' AS "table", j.args ->> 'model' AS model,
       CASE WHEN j.status = 'running' AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = j.pid)
            THEN 'interrupted' ELSE j.status END AS status,
       j.done, j.total,
       round(100.0 * j.done / nullif(j.total, 0), 1) AS percent,
       (j.progress ->> 'failed')::bigint AS failed,
       (j.progress ->> 'rows_per_second')::float8 AS rows_per_second,
       j.started_at, j.finished_at, j.error, j.created_by
  FROM pgtraj.jobs j;
COMMENT ON VIEW pgtraj.job_status IS 'Batch jobs with progress; status interrupted = its backend ended while running';
GRANT SELECT ON pgtraj.job_status TO pgtraj_user;

-- similarity search ----------------------------------------------------------------------------------------

-- An HNSW index for cosine distance on a vector column, named <table>_<column>_hnsw. pgvector's defaults
-- (m 16, ef_construction 64) give recall@10 above 0.95 on trajectory embeddings (benchmarks/); raise
-- ef_construction for more recall at a slower build.
CREATE OR REPLACE FUNCTION pgtraj.create_hnsw_index(source regclass, embedding_column name, m integer DEFAULT 16,
                                                    ef_construction integer DEFAULT 64)
RETURNS regclass
LANGUAGE plpgsql VOLATILE STRICT AS $$
DECLARE
    typ   text;
    dims  integer;
    rel   name;
    nsp   name;
    idx   name;
BEGIN
    SELECT format_type(a.atttypid, a.atttypmod), a.atttypmod INTO typ, dims
      FROM pg_attribute a WHERE a.attrelid = source AND a.attname = embedding_column AND NOT a.attisdropped;
    IF typ IS NULL THEN
        RAISE EXCEPTION 'pgtraj: column % of % does not exist', quote_literal(embedding_column), source
              USING ERRCODE = '42703';
    ELSIF typ NOT LIKE 'vector%' OR dims <= 0 THEN
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
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %s USING hnsw (%I vector_cosine_ops) WITH (m = %s, ef_construction = %s)',
                   idx, source, embedding_column, m, ef_construction);
    RETURN format('%I.%I', nsp, idx)::regclass;
END
$$;
COMMENT ON FUNCTION pgtraj.create_hnsw_index(regclass, name, integer, integer) IS
    'Creates (if missing) an HNSW cosine index on a vector column, named <table>_<column>_hnsw';

-- The column naming a table's rows in search results: its single-column primary key.
CREATE OR REPLACE FUNCTION pgtraj._key_column(source regclass) RETURNS name
LANGUAGE plpgsql STABLE STRICT AS $$
DECLARE
    key name;
BEGIN
    SELECT a.attname INTO key FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
     WHERE i.indrelid = source AND i.indisprimary AND i.indnatts = 1;
    IF key IS NULL THEN
        RAISE EXCEPTION 'pgtraj: % needs a single-column primary key to name its rows', source USING ERRCODE = '42P10';
    END IF;
    RETURN key;
END
$$;

-- The k rows nearest to a query embedding, by cosine distance, through the HNSW index when there is one.
-- ef_search (candidates kept while searching, pgvector's hnsw.ef_search) trades speed for recall; it is
-- set for this transaction only, which is why the function is VOLATILE and PARALLEL UNSAFE.
CREATE OR REPLACE FUNCTION pgtraj.similar(source regclass, embedding_column name, query vector, k integer DEFAULT 10,
                                          ef_search integer DEFAULT 100)
RETURNS TABLE (id text, distance double precision)
LANGUAGE plpgsql VOLATILE STRICT AS $$
DECLARE
    key name;
BEGIN
    IF k < 1 OR k > 10000 OR ef_search < 1 OR ef_search > 1000 THEN
        RAISE EXCEPTION 'pgtraj: k must be 1..10000 and ef_search 1..1000 (got %, %)', k, ef_search
              USING ERRCODE = '22023';
    END IF;
    key := pgtraj._key_column(source);
    IF NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = source AND a.attname = embedding_column
                                                  AND NOT a.attisdropped) THEN
        RAISE EXCEPTION 'pgtraj: column % of % does not exist', quote_literal(embedding_column), source
              USING ERRCODE = '42703';
    END IF;
    PERFORM set_config('hnsw.ef_search', greatest(ef_search, k)::text, true);
    RETURN QUERY EXECUTE format('SELECT %I::text, (%I <=> $1)::float8 FROM %s WHERE %I IS NOT NULL'
                                ' ORDER BY %I <=> $1 LIMIT $2', key, embedding_column, source, embedding_column,
                                embedding_column)
        USING query, k;
END
$$;
COMMENT ON FUNCTION pgtraj.similar(regclass, name, vector, integer, integer) IS
    'The k rows (primary key as text) nearest to a query embedding by cosine distance, through the HNSW index';

CREATE OR REPLACE FUNCTION pgtraj.similar(source regclass, embedding_column name, query geometry, model text,
                                          k integer DEFAULT 10, ef_search integer DEFAULT 100)
RETURNS TABLE (id text, distance double precision)
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT * FROM pgtraj.similar(source, embedding_column, pgtraj.embed(query, model), k, ef_search)
$$;
COMMENT ON FUNCTION pgtraj.similar(regclass, name, geometry, text, integer, integer) IS
    'The k rows most similar to a trajectory: embeds it with the model, then searches the column';

CREATE OR REPLACE FUNCTION pgtraj.similar(source regclass, embedding_column name, row_id bigint, k integer DEFAULT 10,
                                          ef_search integer DEFAULT 100)
RETURNS TABLE (id text, distance double precision)
LANGUAGE plpgsql VOLATILE STRICT AS $$
DECLARE
    key name;
    q   vector;
BEGIN
    IF k < 1 OR k > 10000 THEN
        RAISE EXCEPTION 'pgtraj: k must be 1..10000 (got %)', k USING ERRCODE = '22023';
    END IF;
    key := pgtraj._key_column(source);
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
