-- 0007_moves_and_weights: tokens carry their move, and a model's trained weights travel with it.
--
-- pgtraj.tokenize gains a move column (which grid neighbour of the previous cell a token's cell is,
-- counted from straight on: core/tokenizer.py), so its result type changes: the functions are dropped here
-- and created again by sql/ right after the migrations (with every trajectory form of 55_forms.sql).
--
-- A model version may store its weights (kind 'weights', format 'npz': numpy arrays, no pickled objects)
-- beside its ONNX graphs, so that fine-tuning can start from a registered model (`init_from` a name), the
-- shipped base model included. The runtime never loads them; only training reads them.

DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'pgtraj'::regnamespace AND p.proname IN ('tokenize', '_tokenize') LOOP
        EXECUTE pg_catalog.format('DROP FUNCTION %s', f);
    END LOOP;
END
$$;

ALTER TABLE pgtraj.model_artifacts DROP CONSTRAINT model_artifacts_format_check;
ALTER TABLE pgtraj.model_artifacts ADD CONSTRAINT model_artifacts_format_check
    CHECK (format IN ('onnx', 'npz') AND (kind = 'weights') = (format = 'npz'));
