-- pgtraj SQL API, part 3: trajectories in the forms pgtraj takes, their one wire format, and tokenizing them
-- in queries (the same code as the Python client).

-- An SRID is usable when PostGIS knows it; otherwise ST_Transform fails with an internal error (XX000).
CREATE OR REPLACE FUNCTION pgtraj._known_srid(srid integer) RETURNS integer
LANGUAGE plpgsql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM @extschema:postgis@.spatial_ref_sys s WHERE s.srid = _known_srid.srid) THEN
        RAISE EXCEPTION 'pgtraj: unknown SRID %: PostGIS has no such spatial reference system', srid
              USING ERRCODE = '22023',
                    HINT = 'set the SRID the coordinates are in (ST_SetSRID), or add it to spatial_ref_sys';
    END IF;
    RETURN srid;
END
$$;

-- The one wire format of the runtime: WKB of a WGS84 LINESTRING M. SRID 0 is read as WGS84 (and
-- out-of-range coordinates are refused by the runtime), any other SRID is transformed.
CREATE OR REPLACE FUNCTION pgtraj._wkb(traj geometry) RETURNS bytea
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT @extschema:postgis@.ST_AsBinary(CASE WHEN @extschema:postgis@.ST_SRID(traj) IN (0, 4326) THEN traj
        WHEN pgtraj._known_srid(@extschema:postgis@.ST_SRID(traj)) IS NOT NULL
        THEN @extschema:postgis@.ST_Transform(traj, 4326) END)
$$;

-- A MobilityDB trajectory as the LINESTRING M every function takes: instants, discrete sequences and
-- sequence sets all become one line in time order (M = epoch seconds, as MobilityDB's cast writes it).
CREATE OR REPLACE FUNCTION pgtraj.line(traj tgeompoint) RETURNS geometry
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT @extschema:postgis@.ST_MakeLine(d.geom ORDER BY @extschema:postgis@.ST_M(d.geom))
      FROM @extschema:postgis@.ST_DumpPoints(traj::@extschema:postgis@.geometry) d
$$;
COMMENT ON FUNCTION pgtraj.line(tgeompoint) IS
    'A MobilityDB tgeompoint as a LINESTRING M trajectory (M = epoch seconds), the form every pgtraj function takes';

CREATE OR REPLACE FUNCTION pgtraj.line(traj tgeogpoint) RETURNS geometry
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT pgtraj.line(traj::@extschema:mobilitydb@.tgeompoint)
$$;
COMMENT ON FUNCTION pgtraj.line(tgeogpoint) IS
    'A MobilityDB tgeogpoint as a LINESTRING M trajectory (WGS84, M = epoch seconds)';

CREATE OR REPLACE FUNCTION pgtraj._wkb(traj tgeompoint) RETURNS bytea
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT pgtraj._wkb(pgtraj.line(traj))
$$;

-- A trajectory given as its fixes: points (any SRID) and their times, in any order (sorted by time here).
CREATE OR REPLACE FUNCTION pgtraj.line(points geometry[], times timestamptz[]) RETURNS geometry
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    bad record;
BEGIN
    IF cardinality(points) IS DISTINCT FROM cardinality(times) THEN
        RAISE EXCEPTION 'pgtraj: % points but % times', cardinality(points), cardinality(times)
              USING ERRCODE = '22023', HINT = 'one time per fix';
    END IF;
    -- a fix that is not a point, is empty, has no time or another SRID is refused by its number (1-based,
    -- as everywhere in pgtraj), never dropped quietly
    SELECT u.i, CASE WHEN u.p IS NULL THEN 'its point is NULL'
                     WHEN u.t IS NULL THEN 'its time is NULL'
                     WHEN @extschema:postgis@.GeometryType(u.p) <> 'POINT'
                          THEN 'it is a ' || @extschema:postgis@.GeometryType(u.p) || ', not a POINT'
                     WHEN @extschema:postgis@.ST_IsEmpty(u.p) THEN 'it is an empty point'
                     ELSE format('its SRID is %s, the first fix''s %s', @extschema:postgis@.ST_SRID(u.p),
                                 @extschema:postgis@.ST_SRID(points[1])) END AS why
      INTO bad
      FROM unnest(points, times) WITH ORDINALITY AS u(p, t, i)
     WHERE u.p IS NULL OR u.t IS NULL OR @extschema:postgis@.GeometryType(u.p) <> 'POINT'
        OR @extschema:postgis@.ST_IsEmpty(u.p)
        OR @extschema:postgis@.ST_SRID(u.p) <> @extschema:postgis@.ST_SRID(points[1])
     ORDER BY u.i LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgtraj: fix % of the trajectory cannot be used: %', bad.i, bad.why USING ERRCODE = '22023',
              HINT = 'one point geometry (same SRID throughout) and one time per fix; filter out NULLs first';
    END IF;
    RETURN (SELECT @extschema:postgis@.ST_SetSRID(
                       @extschema:postgis@.ST_MakeLine(@extschema:postgis@.ST_MakePointM(
                           @extschema:postgis@.ST_X(p), @extschema:postgis@.ST_Y(p),
                           extract(epoch FROM t)::double precision) ORDER BY t),
                       @extschema:postgis@.ST_SRID(points[1]))
              FROM unnest(points, times) AS u(p, t));
END
$$;
COMMENT ON FUNCTION pgtraj.line(geometry[], timestamptz[]) IS
    'A LINESTRING M trajectory (M = epoch seconds) from arrays of point fixes and their times';

CREATE OR REPLACE FUNCTION pgtraj._tokenize(wkb bytea, tokenizer text)
RETURNS TABLE (pos integer, token integer, cell h3index, t double precision, dwell real, dt real,
               dow smallint, minute smallint, offset_x real, offset_y real, speed real, heading real,
               interpolated boolean, move smallint)
LANGUAGE plpython3u IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
return pgtraj.encoding.tokenize(plpy, wkb, tokenizer)
$$;

CREATE OR REPLACE FUNCTION pgtraj.tokenize(traj geometry, tokenizer jsonb)
RETURNS TABLE (pos integer, token integer, cell h3index, t double precision, dwell real, dt real,
               dow smallint, minute smallint, offset_x real, offset_y real, speed real, heading real,
               interpolated boolean, move smallint)
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT * FROM pgtraj._tokenize(pgtraj._wkb(traj), tokenizer::text)
$$;
COMMENT ON FUNCTION pgtraj.tokenize(geometry, jsonb) IS
    'H3 tokens and features of a LINESTRING M trajectory (M = epoch seconds, any SRID) under a tokenizer (JSON); move: which grid neighbour of the previous cell (0 straight on, then clockwise by 60 degrees; 6 a jump; 7 the first cell)';
