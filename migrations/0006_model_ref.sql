-- 0006_model_ref: a resolved model as one value, and the one primary-key lookup.
--
-- pgtraj._resolve(model, kind) now returns a pgtraj.model_ref, which every internal serving function takes
-- as it is: each public function is then a single call, pgtraj._task(trajectory, pgtraj._resolve(...), ...),
-- instead of seven copies of a lateral join with a thread setting. The functions whose signature changed
-- are dropped here and created again by sql/ right after the migrations.

CREATE TYPE pgtraj.model_ref AS (
    model_id     bigint,   -- the registry row
    kind         text,     -- which graph (core.contract.GRAPHS)
    sha256       text,     -- of the graph's ONNX bytes
    meta_sha256  text,     -- of the model's tokenizer and config (model_registry.meta_sha256)
    threads      integer   -- onnxruntime intra-op threads (SET pgtraj.threads)
);

DROP FUNCTION IF EXISTS pgtraj._resolve(text, text);
DROP FUNCTION IF EXISTS pgtraj._embed(bytea[], bigint, text, text, integer);
DROP FUNCTION IF EXISTS pgtraj._predict_next(bytea, bigint, text, text, integer, integer, boolean);
DROP FUNCTION IF EXISTS pgtraj._predict_destination(bytea, bigint, text, text, integer, integer);
DROP FUNCTION IF EXISTS pgtraj._predict_path(bytea, bigint, text, text, integer, integer, integer);
DROP FUNCTION IF EXISTS pgtraj._fill_gaps(bytea, bigint, text, text, integer);
DROP FUNCTION IF EXISTS pgtraj._score(bytea, bigint, text, text, integer);
DROP FUNCTION IF EXISTS pgtraj._warmup(bigint, text, integer);
-- the primary key of a table is pgtraj._primary_key's to say, for SQL and the runtime alike
DROP FUNCTION IF EXISTS pgtraj._key_column(regclass);
