-- 0005_hardening: identifiers kept as catalogue references, a content digest for what the runtime caches,
-- rows visible only to roles that may read the table they describe, and nothing left behind by DROP TABLE.
--
-- After this migration no pgtraj role writes pgtraj's tables directly: every write goes through a function
-- that checks the caller's privileges on the table concerned (sql/). What is stored here is read back by
-- code that may run as another, more privileged role (an administrator, pg_cron), so it must not be text
-- that someone could turn into SQL.

-- Tables named by OID (regclass), not by text: a stored name is never pasted into SQL again, and a renamed
-- table is still the same table. A name that no longer resolves belonged to a dropped table. (The view
-- reading these columns is recreated by sql/60_queue.sql.)
DROP VIEW IF EXISTS pgtraj.embedding_status;
DELETE FROM pgtraj.embedding_targets WHERE to_regclass(table_name) IS NULL;
ALTER TABLE pgtraj.embedding_targets ALTER COLUMN table_name TYPE regclass USING to_regclass(table_name);
DELETE FROM pgtraj.embedding_errors WHERE to_regclass(table_name) IS NULL;
ALTER TABLE pgtraj.embedding_errors ALTER COLUMN table_name TYPE regclass USING to_regclass(table_name);

-- The key column a target's triggers queue, fixed when the target is made (it was re-derived at every run).
ALTER TABLE pgtraj.embedding_targets ADD COLUMN key_column name;
UPDATE pgtraj.embedding_targets t
   SET key_column = (SELECT a.attname FROM pg_catalog.pg_index i
                       JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                      WHERE i.indrelid = t.table_name AND i.indisprimary AND i.indnatts = 1);
DELETE FROM pgtraj.embedding_targets WHERE key_column IS NULL;
ALTER TABLE pgtraj.embedding_targets ALTER COLUMN key_column SET NOT NULL;

-- What the in-database runtime loads for a model besides its graphs (tokenizer and config), as bytes whose
-- sha256 names the runtime's cached copy. Content-addressed, a cached file can never be served for another
-- model, another database of the cluster, or an edited row.
CREATE FUNCTION pgtraj._model_doc(tokenizer jsonb, config jsonb) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT pg_catalog.jsonb_send(pg_catalog.jsonb_set(pg_catalog.jsonb_set('{}'::jsonb, '{tokenizer}', tokenizer),
                                                      '{config}', config))
$$;
ALTER TABLE pgtraj.model_registry ADD COLUMN meta_sha256 text NOT NULL
    GENERATED ALWAYS AS (encode(sha256(pgtraj._model_doc(tokenizer, config)), 'hex')) STORED;

-- Row-level security: a role sees the targets, queued keys and failed rows of tables it may read. pgtraj's
-- own SECURITY DEFINER functions run as pgtraj_service (BYPASSRLS) and check privileges themselves.
ALTER TABLE pgtraj.embedding_targets ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgtraj.embedding_queue ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgtraj.embedding_errors ENABLE ROW LEVEL SECURITY;
CREATE POLICY readable_table ON pgtraj.embedding_targets FOR SELECT
    USING (has_any_column_privilege(table_name, 'SELECT'));
CREATE POLICY readable_table ON pgtraj.embedding_errors FOR SELECT
    USING (has_any_column_privilege(table_name, 'SELECT'));
CREATE POLICY readable_table ON pgtraj.embedding_queue FOR SELECT
    USING (EXISTS (SELECT 1 FROM pgtraj.embedding_targets t WHERE t.name = target));

-- Functions whose signature changed; sql/ creates the new ones right after the migrations. The internal
-- serving functions now also take the digest of the model's tokenizer and config and the thread count,
-- and the writers take the role they act for.
DROP FUNCTION IF EXISTS pgtraj._resolve(text, text);
DROP FUNCTION IF EXISTS pgtraj._embed(bytea[], bigint, text, text);
DROP FUNCTION IF EXISTS pgtraj._predict_next(bytea, bigint, text, text, integer, boolean);
DROP FUNCTION IF EXISTS pgtraj._predict_destination(bytea, bigint, text, text, integer);
DROP FUNCTION IF EXISTS pgtraj._predict_path(bytea, bigint, text, text, integer, integer);
DROP FUNCTION IF EXISTS pgtraj._fill_gaps(bytea, bigint, text, text);
DROP FUNCTION IF EXISTS pgtraj._score(bytea, bigint, text, text);
DROP FUNCTION IF EXISTS pgtraj._register(text, text, jsonb, jsonb, jsonb, text, boolean, integer, bigint, text, text[],
                                         bytea[]);
DROP FUNCTION IF EXISTS pgtraj.deploy(text, text, text);
DROP FUNCTION IF EXISTS pgtraj._cron_schedule(text, text, text, text);
DROP FUNCTION IF EXISTS pgtraj._cron_unschedule(text);
DROP FUNCTION IF EXISTS pgtraj.warmup(text);  -- was PL/Python, now SQL over pgtraj._warmup
-- graphs are now checked, not only mirrored, as they are stored (trigger check_artifact, sql/40)
DROP TRIGGER IF EXISTS mirror_artifact ON pgtraj.model_artifacts;
DROP FUNCTION IF EXISTS pgtraj._mirror_artifact();
