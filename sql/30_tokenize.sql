-- pgtraj SQL API, part 3: trajectories in the forms pgtraj takes, and tokenizing them in queries (the same
-- code as the Python client).

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

-- A MobilityDB trajectory as the LINESTRING M every function takes: instants, discrete sequences and
-- sequence sets all become one line in time order (M = epoch seconds, as MobilityDB's cast writes it).
CREATE OR REPLACE FUNCTION pgtraj.line(traj tgeompoint) RETURNS geometry
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT ST_MakeLine(d.geom ORDER BY ST_M(d.geom)) FROM ST_DumpPoints(traj::geometry) d
$$;
COMMENT ON FUNCTION pgtraj.line(tgeompoint) IS
    'A MobilityDB tgeompoint as a LINESTRING M trajectory (M = epoch seconds), the form every pgtraj function takes';

-- A trajectory given as its fixes: points (any SRID) and their times, in any order (sorted by time here).
CREATE OR REPLACE FUNCTION pgtraj.line(points geometry[], times timestamptz[]) RETURNS geometry
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    bad record;
BEGIN
    IF cardinality(points) IS DISTINCT FROM cardinality(times) THEN
        RAISE EXCEPTION 'pgtraj: % points but % times', cardinality(points), cardinality(times)
              USING ERRCODE = '22023', HINT = 'one time per fix';
    END IF;
    -- a fix that is not a point, has no time or another SRID is refused by name, never dropped quietly
    SELECT u.i, CASE WHEN u.p IS NULL THEN 'its point is NULL'
                     WHEN u.t IS NULL THEN 'its time is NULL'
                     WHEN GeometryType(u.p) <> 'POINT' THEN 'it is a ' || GeometryType(u.p) || ', not a POINT'
                     ELSE format('its SRID is %s, the first fix''s %s', ST_SRID(u.p), ST_SRID(points[1])) END AS why
      INTO bad
      FROM unnest(points, times) WITH ORDINALITY AS u(p, t, i)
     WHERE u.p IS NULL OR u.t IS NULL OR GeometryType(u.p) <> 'POINT' OR ST_SRID(u.p) <> ST_SRID(points[1])
     ORDER BY u.i LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgtraj: fix % of the trajectory cannot be used: %', bad.i, bad.why USING ERRCODE = '22023',
              HINT = 'one point geometry (same SRID throughout) and one time per fix; filter out NULLs first';
    END IF;
    RETURN (SELECT ST_SetSRID(ST_MakeLine(ST_MakePointM(ST_X(p), ST_Y(p), extract(epoch FROM t)) ORDER BY t),
                              ST_SRID(points[1]))
              FROM unnest(points, times) AS u(p, t));
END
$$;
COMMENT ON FUNCTION pgtraj.line(geometry[], timestamptz[]) IS
    'A LINESTRING M trajectory (M = epoch seconds) from arrays of point fixes and their times';

CREATE OR REPLACE FUNCTION pgtraj.tokenize(traj tgeompoint, tokenizer jsonb)
RETURNS TABLE (pos integer, token integer, cell h3index, t double precision, dwell real, dt real,
               dow smallint, minute smallint, offset_x real, offset_y real, speed real, heading real,
               interpolated boolean)
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT * FROM pgtraj.tokenize(pgtraj.line(traj), tokenizer) $$;
COMMENT ON FUNCTION pgtraj.tokenize(tgeompoint, jsonb) IS
    'H3 tokens and features of a MobilityDB tgeompoint under a tokenizer (JSON)';
