-- pgtraj SQL API, part 1: the in-database Python runtime.
--
-- Every PL/Python function of pgtraj starts with a BOOT placeholder line that `pgtraj install` replaces with
-- the code loading pgtraj.runtime (numpy + onnxruntime + h3) into the backend once, from the runtime
-- environment's path, and binding it to the local name `pgtraj` (pgtraj/install.py, plpython_body). The
-- rest of the body runs under a handler that turns pgtraj's errors into SQL errors: SQLSTATE, message,
-- hint, no Python traceback. No function runs queries from PL/Python on its hot path: parallel workers
-- may not (see 40_inference.sql).

CREATE OR REPLACE FUNCTION pgtraj.runtime_info() RETURNS jsonb
LANGUAGE plpython3u STABLE PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
import json
return json.dumps(pgtraj.info())
$$;
COMMENT ON FUNCTION pgtraj.runtime_info() IS
    'Versions of pgtraj, Python, numpy, onnxruntime and h3 as seen by PL/Python in this backend';

CREATE OR REPLACE FUNCTION pgtraj.version() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT version FROM pgtraj.installation
$$;
COMMENT ON FUNCTION pgtraj.version() IS 'The pgtraj version installed in this database';

-- What Citus makes of a table: 'distributed' (sharded over the workers), 'reference' (a copy on every node:
-- the registry's tables on a Citus cluster, pgtraj/db/citus.py) or 'local' (a coordinator table in Citus'
-- metadata); NULL for an ordinary table or where Citus is not installed.
CREATE OR REPLACE FUNCTION pgtraj._citus_kind(t regclass) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pgtraj AS $$
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN (SELECT CASE WHEN p.partmethod <> 'n' OR p.colocationid <> 0 AND p.repmodel = 's' THEN 'distributed'
                        WHEN p.repmodel = 't' THEN 'reference' ELSE 'local' END
              FROM pg_catalog.pg_dist_partition p WHERE p.logicalrelid = t);
END
$$;
