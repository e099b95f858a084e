-- pgtraj SQL API, part 5b: every trajectory form for every function that reads one trajectory.
--
-- The functions of 30_tokenize.sql, 40_inference.sql and 50_batch.sql are written once, over a LINESTRING M
-- (geometry).
-- For each of them this makes the same function over the other forms a trajectory is kept in, through
-- pgtraj.line: a MobilityDB tgeompoint or tgeogpoint, and arrays of point fixes and their times (e.g.
-- array_agg over a table of fixes). Same name, same other arguments and defaults, same result, volatility,
-- strictness and parallel safety; tests/sql/api.sql lists them all.

DO $$
DECLARE
    f     record;
    form  record;
    rest  text;
    ident text;
    names text;
BEGIN
    FOR f IN SELECT p.oid, p.proname, p.proretset, p.provolatile, p.proparallel, p.prorows, p.pronargs,
                    pg_get_function_arguments(p.oid) AS arguments, pg_get_function_result(p.oid) AS result,
                    pg_get_function_identity_arguments(p.oid) AS identity,
                    p.proargnames AS argnames
               FROM pg_proc p
              WHERE p.pronamespace = 'pgtraj'::regnamespace
                AND p.proname IN ('tokenize', 'embed', 'predict_next', 'predict_path', 'predict_destination',
                                  'predict_travel_time', 'classify', 'fill_gaps', 'fill_gaps_detail', 'score')
                AND p.proargnames[1] = 'traj' AND p.proargtypes[0] = '@extschema:postgis@.geometry'::regtype LOOP
        rest := regexp_replace(f.arguments, '^traj [^,]+,\s*', '');       -- 'model text, k integer DEFAULT 5'
        ident := regexp_replace(f.identity, '^traj [^,]+,\s*', '');       -- 'model text, k integer'
        names := array_to_string(f.argnames[2:f.pronargs], ', ');        -- 'model, k' (inputs come first)
        FOR form IN VALUES ('traj @extschema:mobilitydb@.tgeompoint', 'pgtraj.line(traj)', 'a MobilityDB tgeompoint'),
                           ('traj @extschema:mobilitydb@.tgeogpoint', 'pgtraj.line(traj)', 'a MobilityDB tgeogpoint'),
                           ('points @extschema:postgis@.geometry[], times timestamptz[]', 'pgtraj.line(points, times)',
                            'arrays of point fixes and their times') LOOP
            EXECUTE format(
                'CREATE OR REPLACE FUNCTION pgtraj.%I(%s, %s) RETURNS %s LANGUAGE sql %s STRICT PARALLEL %s %s'
                ' SET search_path = pg_catalog, pgtraj AS %L',
                f.proname, form.column1, rest, f.result,
                CASE f.provolatile WHEN 'i' THEN 'IMMUTABLE' WHEN 's' THEN 'STABLE' ELSE 'VOLATILE' END,
                CASE f.proparallel WHEN 's' THEN 'SAFE' WHEN 'r' THEN 'RESTRICTED' ELSE 'UNSAFE' END,
                CASE WHEN f.proretset THEN format('ROWS %s', f.prorows) ELSE '' END,
                format(CASE WHEN f.proretset THEN 'SELECT * FROM pgtraj.%I(%s, %s)' ELSE 'SELECT pgtraj.%I(%s, %s)' END,
                       f.proname, form.column2, names));
            EXECUTE format('COMMENT ON FUNCTION pgtraj.%I(%s, %s) IS %L', f.proname, form.column1, ident,
                           obj_description(f.oid, 'pg_proc') || '; over ' || form.column3);
        END LOOP;
    END LOOP;
END
$$;

-- The two functions that take a trajectory in another place than first: similarity (two of them, in the
-- same form) and similar (the query).
DO $$
DECLARE
    form record;
BEGIN
    FOR form IN VALUES ('@extschema:mobilitydb@.tgeompoint', 'a MobilityDB tgeompoint'),
                       ('@extschema:mobilitydb@.tgeogpoint', 'a MobilityDB tgeogpoint') LOOP
        EXECUTE format(
            'CREATE OR REPLACE FUNCTION pgtraj.similarity(a %1$s, b %1$s, model text) RETURNS double precision'
            ' LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS %2$L',
            form.column1, 'SELECT pgtraj.similarity(pgtraj.line(a), pgtraj.line(b), model)');
        EXECUTE format(
            'CREATE OR REPLACE FUNCTION pgtraj.similar(source regclass, embedding_column name, query %1$s, model text,'
            ' k integer DEFAULT 10, ef_search integer DEFAULT 100) RETURNS TABLE (id text, distance double precision)'
            ' LANGUAGE sql VOLATILE STRICT SET search_path = pg_catalog, pgtraj AS %2$L', form.column1,
            'SELECT * FROM pgtraj.similar(source, embedding_column, pgtraj.line(query), model, k, ef_search)');
        EXECUTE format('COMMENT ON FUNCTION pgtraj.similarity(%1$s, %1$s, text) IS %2$L', form.column1,
                       'Cosine similarity of two trajectories; over ' || form.column2);
        EXECUTE format('COMMENT ON FUNCTION pgtraj.similar(regclass, name, %1$s, text, integer, integer) IS %2$L',
                       form.column1, 'The k rows most similar to a trajectory; over ' || form.column2);
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION pgtraj.similarity(a_points geometry[], a_times timestamptz[], b_points geometry[],
                                             b_times timestamptz[], model text) RETURNS double precision
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT pgtraj.similarity(pgtraj.line(a_points, a_times), pgtraj.line(b_points, b_times), model)
$$;
COMMENT ON FUNCTION pgtraj.similarity(geometry[], timestamptz[], geometry[], timestamptz[], text) IS
    'Cosine similarity of two trajectories given as arrays of point fixes and their times';

CREATE OR REPLACE FUNCTION pgtraj.similar(source regclass, embedding_column name, points geometry[],
                                          times timestamptz[], model text, k integer DEFAULT 10,
                                          ef_search integer DEFAULT 100)
RETURNS TABLE (id text, distance double precision)
LANGUAGE sql VOLATILE STRICT SET search_path = pg_catalog, pgtraj AS $$
    SELECT * FROM pgtraj.similar(source, embedding_column, pgtraj.line(points, times), model, k, ef_search)
$$;
COMMENT ON FUNCTION pgtraj.similar(regclass, name, geometry[], timestamptz[], text, integer, integer) IS
    'The k rows most similar to a trajectory given as arrays of point fixes and their times';
