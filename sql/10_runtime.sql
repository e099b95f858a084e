-- pgtraj SQL API, part 1: the in-database Python runtime.
--
-- Every PL/Python function of pgtraj starts with
--     if 'pgtraj' not in GD: plpy.execute('SELECT pgtraj._boot()')
-- and then calls into the importable module GD['pgtraj'] (pgtraj.runtime: numpy + onnxruntime + h3).

CREATE OR REPLACE FUNCTION pgtraj._boot() RETURNS void
LANGUAGE plpython3u VOLATILE PARALLEL SAFE AS $$
if 'pgtraj' in GD:
    return
import site, sys
rows = plpy.execute("SELECT python_path FROM pgtraj.installation")
path = rows[0]["python_path"] if rows.nrows() else None
if path and path not in sys.path:
    # put the runtime environment first, ahead of any older numpy in the system's site-packages
    before = list(sys.path)
    site.addsitedir(path)
    sys.path[:] = [p for p in sys.path if p not in before] + before
try:
    import pgtraj.runtime
except ImportError as exc:
    plpy.error("pgtraj: PL/Python cannot import the pgtraj runtime: %s" % exc,
               detail="python_path = %r, sys.executable = %r" % (path, sys.executable),
               hint="re-run `pgtraj install` (it checks and records the runtime environment)",
               sqlstate="58P01")
GD["pgtraj"] = pgtraj.runtime
$$;
COMMENT ON FUNCTION pgtraj._boot() IS
    'Loads the pgtraj Python runtime into this backend (once per backend); called by every PL/Python function';

CREATE OR REPLACE FUNCTION pgtraj.runtime_info() RETURNS jsonb
LANGUAGE plpython3u STABLE PARALLEL SAFE AS $$
if 'pgtraj' not in GD: plpy.execute('SELECT pgtraj._boot()')
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
