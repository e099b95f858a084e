-- The SQL API's catalogue: every pgtraj function with its volatility, strictness and parallel safety,
-- and who may execute it. A change here is a change of the public contract.
SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')' AS function,
       p.provolatile AS vol, p.proisstrict AS strict, p.proparallel AS par,
       has_function_privilege('pgtraj_user', p.oid, 'EXECUTE') AS user_exec,
       has_function_privilege('pgtraj_admin', p.oid, 'EXECUTE') AS admin_exec
  FROM pg_proc p WHERE p.pronamespace = 'pgtraj'::regnamespace
 ORDER BY 1;

SELECT c.relname, c.relkind,
       has_table_privilege('pgtraj_user', c.oid, 'SELECT') AS user_select,
       has_table_privilege('pgtraj_user', c.oid, 'INSERT') AS user_insert,
       has_table_privilege('pgtraj_admin', c.oid, 'INSERT') AS admin_insert
  FROM pg_class c WHERE c.relnamespace = 'pgtraj'::regnamespace AND c.relkind IN ('r', 'v')
 ORDER BY 1;

SELECT pgtraj.version() = (SELECT pgtraj FROM pgtraj.schema_migrations ORDER BY version DESC LIMIT 1) AS versions_agree;
SELECT key FROM jsonb_object_keys(pgtraj.runtime_info()) AS key ORDER BY 1;
SELECT (pgtraj.runtime_info() ->> 'torch_loaded')::boolean AS torch_loaded;
