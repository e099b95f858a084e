-- The SQL API's catalogue: every pgtraj function with its volatility, strictness and parallel safety,
-- whether it pins search_path, whether it runs with its owner's rights and who that owner is, and who may
-- execute it. A change here is a change of the public contract (and of the security model).
SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')' AS function,
       p.provolatile AS vol, p.proisstrict AS strict, p.proparallel AS par,
       coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pgtraj'], false) AS pinned,
       CASE WHEN NOT p.prosecdef THEN '' WHEN p.proowner = 'pgtraj_service'::regrole THEN 'service'
            ELSE 'installer' END AS definer,
       has_function_privilege('pgtraj_user', p.oid, 'EXECUTE') AS user_exec,
       has_function_privilege('pgtraj_admin', p.oid, 'EXECUTE') AS admin_exec
  FROM pg_proc p WHERE p.pronamespace = 'pgtraj'::regnamespace
 ORDER BY 1;

SELECT c.relname, c.relkind, c.relrowsecurity AS row_security,
       has_table_privilege('pgtraj_user', c.oid, 'SELECT') AS user_select,
       has_table_privilege('pgtraj_user', c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE') AS user_write,
       has_table_privilege('pgtraj_admin', c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE') AS admin_write,
       has_table_privilege('pgtraj_service', c.oid, 'INSERT') AS service_insert
  FROM pg_class c WHERE c.relnamespace = 'pgtraj'::regnamespace AND c.relkind IN ('r', 'v')
 ORDER BY 1;

-- procedures that commit cannot carry SET search_path; their SQL is fully qualified instead
SELECT p.proname FROM pg_proc p
 WHERE p.pronamespace = 'pgtraj'::regnamespace AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pgtraj'], false)
 ORDER BY 1;

SELECT pgtraj.version() = (SELECT pgtraj FROM pgtraj.schema_migrations ORDER BY version DESC LIMIT 1) AS versions_agree;
SELECT key FROM jsonb_object_keys(pgtraj.runtime_info()) AS key ORDER BY 1;
SELECT (pgtraj.runtime_info() ->> 'torch_loaded')::boolean AS torch_loaded;
