-- pgtraj SQL API, part 7: moving models between databases, and bringing in models trained elsewhere.
--
-- An exported model is one self-describing JSON document (format 'pgtraj-model/1') as bytea: name,
-- version, objective, configs, tokenizer, metrics and every ONNX graph (base64) with its sha256. Importing
-- verifies every digest and registers a new version under the same (or a given) name.

CREATE OR REPLACE FUNCTION pgtraj.export_model(model text) RETURNS bytea
LANGUAGE sql STABLE STRICT PARALLEL SAFE AS $$
    SELECT convert_to(jsonb_build_object(
               'format', 'pgtraj-model/1', 'pgtraj', pgtraj.version(),
               'name', m.name, 'version', m.version, 'objective', m.objective, 'config', m.config,
               'tokenizer', m.tokenizer, 'metrics', m.metrics, 'primary_metric', m.primary_metric,
               'higher_is_better', m.higher_is_better, 'embedding_dim', m.embedding_dim,
               'description', m.description, 'created_at', m.created_at,
               'artifacts', (SELECT jsonb_object_agg(a.kind, jsonb_build_object(
                                        'sha256', a.sha256, 'format', a.format,
                                        'bytes', translate(encode(a.bytes, 'base64'), E'\n', '')))
                               FROM pgtraj.model_artifacts a WHERE a.model_id = m.id))::text, 'UTF8')
      FROM pgtraj._resolve(model, 'encoder') r JOIN pgtraj.model_registry m ON m.id = r.model_id
$$;
COMMENT ON FUNCTION pgtraj.export_model(text) IS
    'A model version (''name'' = deployed, ''name@N'') as one portable document (bytea) for pgtraj.import_model';

CREATE OR REPLACE FUNCTION pgtraj.import_model(archive bytea, name text DEFAULT NULL, deploy boolean DEFAULT false)
RETURNS TABLE (model_name text, version integer, model_id bigint)
LANGUAGE plpgsql VOLATILE AS $$  -- not STRICT: name may be NULL (keep the exported name)
#variable_conflict use_column
DECLARE
    doc      jsonb;
    target   text;
    new_id   bigint;
    new_ver  integer;
    k        text;
    a        jsonb;
    raw      bytea;
BEGIN
    IF archive IS NULL THEN
        RAISE EXCEPTION 'pgtraj: import_model() needs an archive, got NULL' USING ERRCODE = '22004';
    END IF;
    BEGIN
        doc := convert_from(archive, 'UTF8')::jsonb;
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'pgtraj: not a pgtraj model archive (not UTF-8 JSON)' USING ERRCODE = '22P02',
              HINT = 'archives come from pgtraj.export_model(''name'')';
    END;
    IF jsonb_typeof(doc) <> 'object' OR doc ->> 'format' IS DISTINCT FROM 'pgtraj-model/1' THEN
        RAISE EXCEPTION 'pgtraj: not a pgtraj model archive (format %)', coalesce(doc ->> 'format', 'missing')
              USING ERRCODE = '22P02', HINT = 'archives come from pgtraj.export_model(''name'')';
    END IF;
    IF jsonb_typeof(doc -> 'artifacts') IS DISTINCT FROM 'object' OR doc -> 'artifacts' = '{}' THEN
        RAISE EXCEPTION 'pgtraj: the archive holds no ONNX graph' USING ERRCODE = '22P02';
    END IF;
    target := coalesce(import_model.name, doc ->> 'name');
    PERFORM pg_advisory_xact_lock(hashtext('pgtraj.register'), hashtext(target));  -- as registry.register
    SELECT coalesce(max(r.version), 0) + 1 INTO new_ver FROM pgtraj.model_registry r WHERE r.name = target;
    INSERT INTO pgtraj.model_registry (name, version, objective, config, tokenizer, metrics, primary_metric,
                                       higher_is_better, embedding_dim, description)
    VALUES (target, new_ver, doc ->> 'objective', coalesce(doc -> 'config', '{}'), doc -> 'tokenizer',
            coalesce(doc -> 'metrics', '{}'), doc ->> 'primary_metric', coalesce((doc ->> 'higher_is_better')::boolean, true),
            (doc ->> 'embedding_dim')::int,
            format('imported: %s v%s (pgtraj %s)%s', doc ->> 'name', doc ->> 'version', doc ->> 'pgtraj',
                   coalesce(': ' || (doc ->> 'description'), '')))
    RETURNING id INTO new_id;
    FOR k, a IN SELECT * FROM jsonb_each(doc -> 'artifacts') LOOP
        raw := decode(a ->> 'bytes', 'base64');
        IF encode(sha256(raw), 'hex') IS DISTINCT FROM a ->> 'sha256' THEN
            RAISE EXCEPTION 'pgtraj: graph % of the archive does not match its sha256', quote_literal(k)
                  USING ERRCODE = 'data_corrupted', HINT = 'the archive was altered or truncated: export it again';
        END IF;
        INSERT INTO pgtraj.model_artifacts (model_id, kind, format, bytes, sha256)
        VALUES (new_id, k, coalesce(a ->> 'format', 'onnx'), raw, a ->> 'sha256');
    END LOOP;
    IF import_model.deploy THEN
        PERFORM pgtraj.deploy(target, new_ver::text, 'imported');
    END IF;
    RETURN QUERY SELECT target, new_ver, new_id;
END
$$;
COMMENT ON FUNCTION pgtraj.import_model(bytea, text, boolean) IS
    'Registers a model exported by pgtraj.export_model (digests verified) as a new version; deploy => true deploys it';
REVOKE ALL ON FUNCTION pgtraj.import_model(bytea, text, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtraj.import_model(bytea, text, boolean) TO pgtraj_admin;

-- A model trained outside pgtraj: its ONNX graphs must take pgtraj's inputs (tokens, dow, minute, cont:
-- what pgtraj.tokenize and the featuriser produce under the given tokenizer) and give the outputs of
-- pgtraj/export.py's graph of the same kind. Checked by loading each graph in onnxruntime.
CREATE OR REPLACE FUNCTION pgtraj.import_onnx(name text, objective text, tokenizer jsonb, graphs jsonb,
                                              config jsonb DEFAULT '{}', description text DEFAULT NULL)
RETURNS TABLE (model_name text, version integer, model_id bigint)
LANGUAGE plpython3u VOLATILE AS $$
@BOOT@
import base64, hashlib, json
rt = GD['pgtraj']
if name is None or objective is None or tokenizer is None or graphs is None:
    plpy.error("pgtraj: import_onnx() needs a name, an objective, a tokenizer and graphs", sqlstate="22004")
try:
    arts = {k: base64.b64decode(v, validate=True) for k, v in json.loads(graphs).items()}
except (ValueError, AttributeError, TypeError):
    plpy.error("pgtraj: graphs must be a JSON object of kind -> base64 ONNX bytes", sqlstate="22P02",
               hint="jsonb_build_object('encoder', encode(pg_read_binary_file('/path/encoder.onnx'), 'base64'))")
if not arts:
    plpy.error("pgtraj: graphs is empty", sqlstate="22P02")
try:
    tok = rt.Tokenizer.from_json(tokenizer)
except Exception as exc:
    plpy.error("pgtraj: the tokenizer is not a pgtraj tokenizer: %s" % exc, sqlstate="22P02")
dims = None
for kind, data in arts.items():
    err = rt.inference.check_graph(kind, data, tok.vocab_size)
    if err:
        plpy.error("pgtraj: graph %r: %s" % (kind, err), sqlstate="22023",
                   hint="export with pgtraj/export.py, or match its inputs (tokens, dow, minute, cont) and outputs")
    if kind == "encoder":
        dims = rt.inference.output_width(data)
plan = plpy.prepare("SELECT pg_advisory_xact_lock(hashtext('pgtraj.register'), hashtext($1))", ["text"])
plpy.execute(plan, [name])
ver = plpy.execute(plpy.prepare("SELECT coalesce(max(version), 0) + 1 AS v FROM pgtraj.model_registry WHERE name = $1",
                                ["text"]), [name])[0]["v"]
mid = plpy.execute(plpy.prepare(
    "INSERT INTO pgtraj.model_registry (name, version, objective, config, tokenizer, embedding_dim, description)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
    ["text", "int4", "text", "jsonb", "jsonb", "int4", "text"]),
    [name, ver, objective, config, tokenizer, dims, description or "imported ONNX"])[0]["id"]
ins = plpy.prepare("INSERT INTO pgtraj.model_artifacts (model_id, kind, bytes, sha256) VALUES ($1, $2, $3, $4)",
                   ["int8", "text", "bytea", "text"])
for kind, data in arts.items():
    plpy.execute(ins, [mid, kind, data, hashlib.sha256(data).hexdigest()])
return [(name, ver, mid)]
$$;
COMMENT ON FUNCTION pgtraj.import_onnx(text, text, jsonb, jsonb, jsonb, text) IS
    'Registers ONNX graphs trained outside pgtraj (kind -> base64) with their pgtraj tokenizer, after checking each loads and fits';
REVOKE ALL ON FUNCTION pgtraj.import_onnx(text, text, jsonb, jsonb, jsonb, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtraj.import_onnx(text, text, jsonb, jsonb, jsonb, text) TO pgtraj_admin;
