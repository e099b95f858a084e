-- pgtraj SQL API, part 3: tokenizing trajectories in queries (the same code as the Python client).

CREATE OR REPLACE FUNCTION pgtraj._tokenize(wkb bytea, tokenizer text)
RETURNS TABLE (pos integer, token integer, cell h3index, t double precision, dwell real, dt real,
               dow smallint, minute smallint, offset_x real, offset_y real, speed real, heading real,
               interpolated boolean)
LANGUAGE plpython3u IMMUTABLE STRICT PARALLEL SAFE AS $$
@BOOT@
rt = GD['pgtraj']
try:
    return rt.tokenize(wkb, tokenizer)
except rt.PgtrajError as exc:
    plpy.error("pgtraj.tokenize: %s" % exc.message, hint=exc.hint, sqlstate="22023")
$$;

CREATE OR REPLACE FUNCTION pgtraj.tokenize(traj geometry, tokenizer jsonb)
RETURNS TABLE (pos integer, token integer, cell h3index, t double precision, dwell real, dt real,
               dow smallint, minute smallint, offset_x real, offset_y real, speed real, heading real,
               interpolated boolean)
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT * FROM pgtraj._tokenize(ST_AsBinary(ST_Transform(traj, 4326)), tokenizer::text)
$$;
COMMENT ON FUNCTION pgtraj.tokenize(geometry, jsonb) IS
    'H3 tokens and features of a LINESTRING M trajectory (M = epoch seconds, any SRID) under a tokenizer (JSON)';

CREATE OR REPLACE FUNCTION pgtraj.tokenize(traj tgeompoint, tokenizer jsonb)
RETURNS TABLE (pos integer, token integer, cell h3index, t double precision, dwell real, dt real,
               dow smallint, minute smallint, offset_x real, offset_y real, speed real, heading real,
               interpolated boolean)
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    -- instants, discrete sequences and sequence sets all become one LINESTRING M in time order
    SELECT * FROM pgtraj.tokenize((SELECT ST_MakeLine(d.geom ORDER BY ST_M(d.geom))
                                     FROM ST_DumpPoints(traj::geometry) d), tokenizer)
$$;
COMMENT ON FUNCTION pgtraj.tokenize(tgeompoint, jsonb) IS
    'H3 tokens and features of a MobilityDB tgeompoint under a tokenizer (JSON)';
