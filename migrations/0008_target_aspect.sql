-- 0008_target_aspect: an embedding target keeps its column filled with one aspect of the embedding, as
-- CALL pgtraj.embed_table(..., aspect => ...) does: 'route' (where a trip goes, any day: what every target
-- made before this was) or 'spacetime' (the route and when: core/aspects.py).

ALTER TABLE pgtraj.embedding_targets ADD COLUMN aspect text NOT NULL DEFAULT 'route'
    CHECK (aspect IN ('route', 'spacetime'));
