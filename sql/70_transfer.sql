-- pgtraj SQL API, part 7: moving models between databases, and bringing in models trained elsewhere.
--
-- An exported model is one self-describing JSON document (format 'pgtraj-model/1') as bytea: name,
-- version, objective, configs, tokenizer, metrics and every ONNX graph (base64) with its sha256. Importing
-- verifies every digest and registers a new version under the same (or a given) name through
-- pgtraj._register, which checks every graph like any other registration.

CREATE OR REPLACE FUNCTION pgtraj.export_model(model text) RETURNS bytea
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pgtraj AS $$
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

-- not STRICT: name may be NULL (keep the exported name)
CREATE OR REPLACE FUNCTION pgtraj.import_model(archive bytea, name text DEFAULT NULL, deploy boolean DEFAULT false)
RETURNS TABLE (model_name text, version integer, model_id bigint)
LANGUAGE plpython3u VOLATILE SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
return pgtraj.transfer.import_model(plpy, archive, name, deploy)
$$;
COMMENT ON FUNCTION pgtraj.import_model(bytea, text, boolean) IS
    'Registers a model exported by pgtraj.export_model (digests and graphs checked) as a new version; deploy => true deploys it';

-- A model trained outside pgtraj: its ONNX graphs must take pgtraj's inputs (tokens, dow, minute, cont:
-- what pgtraj.tokenize and the featuriser produce under the given tokenizer) and give the outputs of
-- pgtraj/export.py's graph of the same kind.
CREATE OR REPLACE FUNCTION pgtraj.import_onnx(name text, objective text, tokenizer jsonb, graphs jsonb,
                                              config jsonb DEFAULT '{}', description text DEFAULT NULL)
RETURNS TABLE (model_name text, version integer, model_id bigint)
LANGUAGE plpython3u VOLATILE SET search_path = pg_catalog, pgtraj AS $$
@BOOT@
return pgtraj.transfer.import_onnx(plpy, name, objective, tokenizer, graphs, config, description)
$$;
COMMENT ON FUNCTION pgtraj.import_onnx(text, text, jsonb, jsonb, jsonb, text) IS
    'Registers ONNX graphs trained outside pgtraj (kind -> base64) with their pgtraj tokenizer, after checking each loads and fits';
