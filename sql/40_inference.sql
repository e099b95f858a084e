-- pgtraj SQL API, part 4: inference in queries (embeddings, next location, surprise).
--
-- Models are named as in the registry: 'name' is the deployed version, 'name@3' version 3. Each call
-- resolves the name in plain SQL (pgtraj._resolve, one indexed lookup), so a redeploy is visible to every
-- backend at its next call, and hands PL/Python a pgtraj.model_ref: the model id, the graph's kind and
-- sha256, the sha256 of the model's tokenizer and config, and the thread count (SET pgtraj.threads = n,
-- default 1). The runtime caches by those digests, per backend and in files under the server's data
-- directory, so nothing cached can be served for another model, version or database. Each graph kind is
-- served by one module of pgtraj/runtime/tasks/; core/contract.py says which function serves which.
-- Registry-reading functions are STABLE (never IMMUTABLE: a redeploy changes their result), STRICT
-- (a NULL trajectory gives NULL) and PARALLEL SAFE: the PL/Python side runs no query on its hot path (a
-- parallel worker may not), loading models from the cached files when it has to.
--
-- Trajectories: PostGIS LINESTRING M (M = epoch seconds; any SRID PostGIS knows, transformed to WGS84; SRID
-- 0 is read as WGS84 and out-of-range coordinates are refused); 55_forms.sql adds, for every function here,
-- the same function over a MobilityDB tgeompoint or tgeogpoint and over arrays of point fixes and their
-- times. Unusable input (no M, not a line, NaN, time going backwards, ...) raises SQLSTATE 22023 naming
-- the problem.

-- What a model name means now, or an error saying why not.
CREATE OR REPLACE FUNCTION pgtraj._resolve(model text, kind text) RETURNS pgtraj.model_ref
LANGUAGE plpgsql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
DECLARE
    m text[] := regexp_match(model, '^([^@]*)(?:@([0-9]{1,9}))?$');  -- name, and a version after '@'
    n text := coalesce(nullif(current_setting('pgtraj.threads', true), ''), '1');
    r pgtraj.model_ref;
BEGIN
    IF m IS NULL OR NOT pgtraj._is_model_name(m[1]) THEN
        RAISE EXCEPTION 'pgtraj: invalid model name %', quote_literal(model) USING ERRCODE = '22023',
              HINT = 'a registered name (''trips'') or a name and version (''trips@3'')';
    END IF;
    IF n !~ '^[0-9]{1,2}$' OR n::int NOT BETWEEN 1 AND 64 THEN
        RAISE EXCEPTION 'pgtraj: pgtraj.threads must be an integer from 1 to 64, not %', quote_literal(n)
              USING ERRCODE = '22023', HINT = 'SET pgtraj.threads = 1';
    END IF;
    r.threads := n::int;
    r.kind := kind;
    IF m[2] IS NULL THEN
        SELECT d.model_id INTO r.model_id FROM pgtraj.deployment_log d
         WHERE d.model_name = m[1] ORDER BY d.id DESC LIMIT 1;
    ELSE
        SELECT x.id INTO r.model_id FROM pgtraj.model_registry x WHERE x.name = m[1] AND x.version = m[2]::int;
    END IF;
    IF r.model_id IS NULL THEN
        IF NOT EXISTS (SELECT 1 FROM pgtraj.model_registry x WHERE x.name = m[1]) THEN
            RAISE EXCEPTION 'pgtraj: no model named %', quote_literal(m[1]) USING ERRCODE = '42704',
                  HINT = 'SELECT name, version, deployed FROM pgtraj.models lists the registered models';
        ELSIF m[2] IS NULL THEN
            RAISE EXCEPTION 'pgtraj: model % has no deployed version', quote_literal(m[1]) USING ERRCODE = '55000',
                  HINT = format('deploy one: SELECT pgtraj.deploy(%L), or name a version: %L', m[1], m[1] || '@1');
        ELSE
            RAISE EXCEPTION 'pgtraj: model % has no version %', quote_literal(m[1]), m[2] USING ERRCODE = '42704',
                  HINT = format('SELECT version FROM pgtraj.models WHERE name = %L lists its versions', m[1]);
        END IF;
    END IF;
    -- older models predict next cells with a next_cell graph instead of next_move (pgtraj 0.1), and fill
    -- gaps with a masked graph (one cell per position) instead of masked_logp (0.2.0)
    SELECT a.kind, a.sha256, x.meta_sha256 INTO r.kind, r.sha256, r.meta_sha256
      FROM pgtraj.model_artifacts a JOIN pgtraj.model_registry x ON x.id = a.model_id
     WHERE a.model_id = r.model_id
       AND a.kind IN (_resolve.kind, CASE _resolve.kind WHEN 'next_move' THEN 'next_cell'
                                                        WHEN 'masked_logp' THEN 'masked' END)
     ORDER BY a.kind = _resolve.kind DESC LIMIT 1;
    IF r.sha256 IS NULL THEN
        RAISE EXCEPTION 'pgtraj: model % has no % graph (it has: %)', quote_literal(model), quote_literal(kind),
              (SELECT string_agg(a.kind, ', ' ORDER BY a.kind) FROM pgtraj.model_artifacts a
                WHERE a.model_id = r.model_id)
              USING ERRCODE = '0A000',
                    HINT = CASE kind
                        WHEN 'destination' THEN 'fine-tune one: pgtraj train NAME --objective destination --init-from CHECKPOINT'
                        WHEN 'token_nll' THEN 'retrain the model: versions without this graph cannot score'
                        WHEN 'travel_time' THEN 'fine-tune one: pgtraj train NAME --objective travel_time --init-from CHECKPOINT'
                        WHEN 'classify' THEN 'fine-tune one: pgtraj train NAME --objective classify --label-column COLUMN'
                        ELSE 'use a model trained for this task' END;
    END IF;
    RETURN r;
END
$$;

-- Every graph stored, by whatever path and role, is checked (pgtraj/runtime/graphs.py: it loads in
-- onnxruntime from its own bytes, reads no external file, uses no custom operator, fits its kind and the
-- model's tokenizer; an encoder's width is the model's embedding_dim), then written to the runtime's file
-- cache, so that parallel workers, which may not query from PL/Python, can load a model no backend has
-- used yet. A graph that fails the check fails the INSERT.
CREATE OR REPLACE FUNCTION pgtraj._check_graph(model_id bigint, kind text, sha256 text, bytes bytea) RETURNS void
LANGUAGE plpython3u VOLATILE SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
pgtraj.graphs.check_artifact(plpy, {"model_id": model_id, "kind": kind, "sha256": sha256, "bytes": bytes})
$$;
CREATE OR REPLACE FUNCTION pgtraj._check_artifact() RETURNS trigger
LANGUAGE plpython3u SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
pgtraj.graphs.check_artifact(plpy, TD["new"])
$$;
-- The check is a trigger, so that a superuser's own INSERT is checked too; except on Citus, where the
-- registry is a reference table, which can carry no trigger: there pgtraj._register, the one way in for
-- every other role, checks each graph before storing it. (One statement each: Citus sends a trigger's
-- statement text, and no more, to every node.)
DO $$
BEGIN
    IF pgtraj._citus_kind('pgtraj.model_artifacts') IS DISTINCT FROM 'reference' THEN
        DROP TRIGGER IF EXISTS check_artifact ON pgtraj.model_artifacts;
        CREATE TRIGGER check_artifact AFTER INSERT OR UPDATE ON pgtraj.model_artifacts
            FOR EACH ROW EXECUTE FUNCTION pgtraj._check_artifact();
    END IF;
END
$$;

-- embeddings ---------------------------------------------------------------------------------------------

-- aspect: 'route' (where a trip goes, any day or hour: what the two-argument forms give) or 'spacetime'
-- (where and when: the route plus a code of its start and end times, core/aspects.py)
CREATE OR REPLACE FUNCTION pgtraj._embed(wkbs bytea[], m pgtraj.model_ref, aspect text) RETURNS vector[]
LANGUAGE plpython3u STABLE PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
return pgtraj.encoder.embed_many(plpy, wkbs, pgtraj.models.Ref.of(m, 'encoder'), aspect)
$$;

CREATE OR REPLACE FUNCTION pgtraj._embed(wkbs bytea[], m pgtraj.model_ref) RETURNS vector[]
LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT pgtraj._embed(wkbs, m, 'route')
$$;

CREATE OR REPLACE FUNCTION pgtraj._embed(wkbs bytea[], model text, aspect text) RETURNS vector[]
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT pgtraj._embed(wkbs, pgtraj._resolve(model, 'encoder'), aspect)
$$;

CREATE OR REPLACE FUNCTION pgtraj._embed(wkbs bytea[], model text) RETURNS vector[]
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT pgtraj._embed(wkbs, model, 'route')
$$;

CREATE OR REPLACE FUNCTION pgtraj.embed(traj geometry, model text, aspect text) RETURNS vector
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT (pgtraj._embed(ARRAY[pgtraj._wkb(traj)], model, aspect))[1]
$$;
COMMENT ON FUNCTION pgtraj.embed(geometry, text, text) IS
    'Embedding of a LINESTRING M trajectory of one aspect: ''route'' (where it goes, any day or hour) or ''spacetime'' (where and when: the route plus a code of its start and end times, 32 more dimensions)';

CREATE OR REPLACE FUNCTION pgtraj.embed(traj geometry, model text) RETURNS vector
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT pgtraj.embed(traj, model, 'route')
$$;
COMMENT ON FUNCTION pgtraj.embed(geometry, text) IS
    'Route embedding (pgvector, unit length) of a LINESTRING M trajectory under a model (''name'' = deployed, ''name@N'' = version N)';

CREATE OR REPLACE FUNCTION pgtraj.embed(trajs geometry[], model text, aspect text) RETURNS vector[]
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT pgtraj._embed(ARRAY(SELECT pgtraj._wkb(u.g) FROM unnest(trajs) WITH ORDINALITY AS u(g, i) ORDER BY u.i),
                         model, aspect)
$$;
COMMENT ON FUNCTION pgtraj.embed(geometry[], text, text) IS
    'Embeddings of one aspect (route, spacetime) of many trajectories in one batched model call, in input order';

CREATE OR REPLACE FUNCTION pgtraj.embed(trajs geometry[], model text) RETURNS vector[]
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT pgtraj.embed(trajs, model, 'route')
$$;
COMMENT ON FUNCTION pgtraj.embed(geometry[], text) IS
    'Route embeddings of many trajectories in one batched model call, in input order (NULL in, NULL out)';

CREATE OR REPLACE FUNCTION pgtraj.similarity(a geometry, b geometry, model text, aspect text)
RETURNS double precision
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT 1 - (e[1] OPERATOR(@extschema:vector@.<=>) e[2])
      FROM pgtraj._embed(ARRAY[pgtraj._wkb(a), pgtraj._wkb(b)], model, aspect) AS e
$$;
COMMENT ON FUNCTION pgtraj.similarity(geometry, geometry, text, text) IS
    'Cosine similarity of two trajectories'' embeddings of one aspect (route, spacetime)';

CREATE OR REPLACE FUNCTION pgtraj.similarity(a geometry, b geometry, model text) RETURNS double precision
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT pgtraj.similarity(a, b, model, 'route')
$$;
COMMENT ON FUNCTION pgtraj.similarity(geometry, geometry, text) IS
    'Cosine similarity of two trajectories'' route embeddings (1 = the same route as the model sees it)';

-- next location ------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION pgtraj._predict_next(wkb bytea, m pgtraj.model_ref, k integer, constrained boolean)
RETURNS TABLE (rank integer, cell text, lat double precision, lon double precision, probability double precision,
               expected_seconds double precision)
LANGUAGE plpython3u STABLE PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
return pgtraj.next_move.predict_next(plpy, wkb, pgtraj.models.Ref.of(m, pgtraj.next_move.KINDS), k, constrained)
$$;

CREATE OR REPLACE FUNCTION pgtraj.predict_next(traj geometry, model text, k integer DEFAULT 5,
                                               constrained boolean DEFAULT true)
RETURNS TABLE (rank integer, cell h3index, geom geometry(Point, 4326), probability double precision,
               expected_seconds double precision)
LANGUAGE sql STABLE STRICT PARALLEL SAFE ROWS 5 SET search_path = pg_catalog, pgtraj AS $$
    SELECT p.rank, p.cell::@extschema:h3@.h3index,
           @extschema:postgis@.ST_SetSRID(@extschema:postgis@.ST_MakePoint(p.lon, p.lat), 4326),
           p.probability, p.expected_seconds
      FROM pgtraj._predict_next(pgtraj._wkb(traj), pgtraj._resolve(model, 'next_move'), k, constrained) p
$$;
COMMENT ON FUNCTION pgtraj.predict_next(geometry, text, integer, boolean) IS
    'The k likeliest next H3 cells of a trajectory (rank, cell, centre point, probability, expected seconds until the trip enters it): grid neighbours of its last cell, at most six; constrained applies to models of pgtraj 0.1 only (next_cell graphs: grid neighbours first)';

CREATE OR REPLACE FUNCTION pgtraj._predict_destination(wkb bytea, m pgtraj.model_ref, k integer)
RETURNS TABLE (rank integer, cell text, lat double precision, lon double precision, probability double precision)
LANGUAGE plpython3u STABLE PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
return pgtraj.destination.predict_destination(plpy, wkb, pgtraj.models.Ref.of(m, 'destination'), k)
$$;

CREATE OR REPLACE FUNCTION pgtraj.predict_destination(traj geometry, model text, k integer DEFAULT 5)
RETURNS TABLE (rank integer, cell h3index, geom geometry(Point, 4326), probability double precision)
LANGUAGE sql STABLE STRICT PARALLEL SAFE ROWS 5 SET search_path = pg_catalog, pgtraj AS $$
    SELECT p.rank, p.cell::@extschema:h3@.h3index,
           @extschema:postgis@.ST_SetSRID(@extschema:postgis@.ST_MakePoint(p.lon, p.lat), 4326), p.probability
      FROM pgtraj._predict_destination(pgtraj._wkb(traj), pgtraj._resolve(model, 'destination'), k) p
$$;
COMMENT ON FUNCTION pgtraj.predict_destination(geometry, text, integer) IS
    'The k likeliest destinations (last H3 cell) of a trip in progress; needs a model fine-tuned with the destination objective';

CREATE OR REPLACE FUNCTION pgtraj._predict_path(wkb bytea, m pgtraj.model_ref, steps integer, beam integer)
RETURNS TABLE (step integer, cell text, lat double precision, lon double precision, t double precision,
               probability double precision)
LANGUAGE plpython3u STABLE PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
return pgtraj.next_move.predict_path(plpy, wkb, pgtraj.models.Ref.of(m, pgtraj.next_move.KINDS), steps, beam)
$$;

CREATE OR REPLACE FUNCTION pgtraj.predict_path(traj geometry, model text, steps integer DEFAULT 10, beam integer DEFAULT 4)
RETURNS geometry
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT @extschema:postgis@.ST_SetSRID(@extschema:postgis@.ST_MakeLine(
               @extschema:postgis@.ST_MakePointM(p.lon, p.lat, p.t) ORDER BY p.step), 4326)
      FROM pgtraj._predict_path(pgtraj._wkb(traj), pgtraj._resolve(model, 'next_move'), steps, beam) p
$$;
COMMENT ON FUNCTION pgtraj.predict_path(geometry, text, integer, integer) IS
    'The likeliest continuation of a trip (beam search over grid-neighbour moves) as a LINESTRING M from its last fix, M = predicted epoch seconds';

CREATE OR REPLACE FUNCTION pgtraj._fill_gaps(wkb bytea, m pgtraj.model_ref)
RETURNS TABLE (lat double precision, lon double precision, t double precision, filled boolean,
               probability double precision)
LANGUAGE plpython3u STABLE PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
return pgtraj.masked.fill_gaps(plpy, wkb, pgtraj.models.Ref.of(m, pgtraj.masked.KINDS))
$$;

CREATE OR REPLACE FUNCTION pgtraj.fill_gaps(traj geometry, model text) RETURNS geometry
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT @extschema:postgis@.ST_SetSRID(@extschema:postgis@.ST_MakeLine(
               @extschema:postgis@.ST_MakePointM(p.lon, p.lat, p.t) ORDER BY p.t, p.filled), 4326)
      FROM pgtraj._fill_gaps(pgtraj._wkb(traj), pgtraj._resolve(model, 'masked_logp')) p
$$;
COMMENT ON FUNCTION pgtraj.fill_gaps(geometry, text) IS
    'The trajectory (WGS84 LINESTRING M) with the H3 cells it skipped between sparse fixes recovered by a masked-span model (each one''s expected place over the contiguous grid paths between the fixes around its gap), instead of a straight line';

CREATE OR REPLACE FUNCTION pgtraj.fill_gaps_detail(traj geometry, model text)
RETURNS TABLE (geom geometry(PointM, 4326), filled boolean, probability double precision)
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT @extschema:postgis@.ST_SetSRID(@extschema:postgis@.ST_MakePointM(p.lon, p.lat, p.t), 4326),
           p.filled, p.probability
      FROM pgtraj._fill_gaps(pgtraj._wkb(traj), pgtraj._resolve(model, 'masked_logp')) p
     ORDER BY p.t, p.filled
$$;
COMMENT ON FUNCTION pgtraj.fill_gaps_detail(geometry, text) IS
    'The points of pgtraj.fill_gaps: observed fixes (filled = false) and recovered places, each with the model''s probability of the H3 cell it lies in';

-- surprise -----------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION pgtraj._score(wkb bytea, m pgtraj.model_ref)
RETURNS double precision
LANGUAGE plpython3u STABLE PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
return pgtraj.token_nll.score(plpy, wkb, pgtraj.models.Ref.of(m, 'token_nll'))
$$;

CREATE OR REPLACE FUNCTION pgtraj._score(wkb bytea, model text) RETURNS double precision
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT pgtraj._score(wkb, pgtraj._resolve(model, 'token_nll'))
$$;

CREATE OR REPLACE FUNCTION pgtraj.score(traj geometry, model text) RETURNS double precision
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT pgtraj._score(pgtraj._wkb(traj), model)
$$;
COMMENT ON FUNCTION pgtraj.score(geometry, text) IS
    'Mean surprise of a trajectory, -log p(next cell | trip so far) in nats per cell: high = unusual (anomaly score)';

-- travel time, classes ---------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION pgtraj._predict_travel_time(wkb bytea, m pgtraj.model_ref) RETURNS double precision
LANGUAGE plpython3u STABLE PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
return pgtraj.travel_time.predict_travel_time(plpy, wkb, pgtraj.models.Ref.of(m, 'travel_time'))
$$;

CREATE OR REPLACE FUNCTION pgtraj.predict_travel_time(traj geometry, model text) RETURNS double precision
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
    SELECT pgtraj._predict_travel_time(pgtraj._wkb(traj), pgtraj._resolve(model, 'travel_time'))
$$;
COMMENT ON FUNCTION pgtraj.predict_travel_time(geometry, text) IS
    'Seconds a route takes from its first fix to its last, given where it goes and when it leaves (the M of its first fix); needs a model fine-tuned with the travel_time objective';

CREATE OR REPLACE FUNCTION pgtraj._classify(wkb bytea, m pgtraj.model_ref, k integer)
RETURNS TABLE (rank integer, label text, probability double precision)
LANGUAGE plpython3u STABLE PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
return pgtraj.classify.classify(plpy, wkb, pgtraj.models.Ref.of(m, 'classify'), k)
$$;

CREATE OR REPLACE FUNCTION pgtraj.classify(traj geometry, model text, k integer DEFAULT 1)
RETURNS TABLE (rank integer, label text, probability double precision)
LANGUAGE sql STABLE STRICT PARALLEL SAFE ROWS 1 SET search_path = pg_catalog, pgtraj AS $$
    SELECT * FROM pgtraj._classify(pgtraj._wkb(traj), pgtraj._resolve(model, 'classify'), k)
$$;
COMMENT ON FUNCTION pgtraj.classify(geometry, text, integer) IS
    'The k likeliest labels of a trajectory (rank, label, probability) among the classes a model was fine-tuned on with the classify objective (transport mode, user, ...)';

-- session cache ------------------------------------------------------------------------------------------

-- PARALLEL RESTRICTED: the point is to load the model in this backend, not in a parallel worker
CREATE OR REPLACE FUNCTION pgtraj._warmup(m pgtraj.model_ref) RETURNS jsonb
LANGUAGE plpython3u STABLE STRICT PARALLEL RESTRICTED SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
import json
return json.dumps(pgtraj.models.warmup(plpy, pgtraj.models.Ref.of(m, 'encoder')))
$$;

CREATE OR REPLACE FUNCTION pgtraj.warmup(model text) RETURNS jsonb
LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED SET search_path = pg_catalog, pgtraj AS $$
    SELECT pgtraj._warmup(pgtraj._resolve(model, 'encoder'))
$$;
COMMENT ON FUNCTION pgtraj.warmup(text) IS
    'Loads every ONNX graph of a model into this backend''s cache (the first inference call pays it otherwise)';
