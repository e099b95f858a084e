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
