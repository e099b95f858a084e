-- pgtraj SQL API, part 1: the in-database Python runtime.
--
-- Every PL/Python function of pgtraj starts with a BOOT placeholder line that `pgtraj install` replaces with
-- the code loading pgtraj.runtime (numpy + onnxruntime + h3) into the backend once, from the runtime
-- environment's path (pgtraj/install.py, boot_snippet); the function then calls GD['pgtraj'].
-- No function runs queries from PL/Python on its hot path: parallel workers may not (see 40_inference.sql).

DROP FUNCTION IF EXISTS pgtraj._boot();  -- earlier development builds loaded the runtime through a query

CREATE OR REPLACE FUNCTION pgtraj.runtime_info() RETURNS jsonb
LANGUAGE plpython3u STABLE PARALLEL SAFE AS $$
@BOOT@
import json
return json.dumps(GD['pgtraj'].info())
$$;
COMMENT ON FUNCTION pgtraj.runtime_info() IS
    'Versions of pgtraj, Python, numpy, onnxruntime and h3 as seen by PL/Python in this backend';

CREATE OR REPLACE FUNCTION pgtraj.version() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT version FROM pgtraj.installation
$$;
COMMENT ON FUNCTION pgtraj.version() IS 'The pgtraj version installed in this database';
