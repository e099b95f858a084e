-- pgtraj SQL API, part 5: batch embedding of whole tables, with its bookkeeping.

GRANT SELECT, INSERT, UPDATE ON pgtraj.jobs TO pgtraj_user;
GRANT SELECT, INSERT, UPDATE, DELETE ON pgtraj.embedding_errors TO pgtraj_user;

CREATE OR REPLACE PROCEDURE pgtraj.embed_table(source regclass, traj_column name, embedding_column name,
                                               model text, batch_size integer DEFAULT 500)
LANGUAGE plpython3u AS $$
@BOOT@
rt = GD['pgtraj']
threads = plpy.execute("SELECT current_setting('pgtraj.threads', true) AS t")[0]["t"]
rt.inference.call(plpy, rt.batch.embed_table, source, traj_column, embedding_column, model, batch_size, threads)
$$;
COMMENT ON PROCEDURE pgtraj.embed_table(regclass, name, name, text, integer) IS
    'Fills a vector column with a model''s embeddings, batch by batch (each committed): only rows with no embedding or one from another model version; unusable rows go to pgtraj.embedding_errors';

-- Jobs as people want to read them: a 'running' job whose backend is gone was interrupted.
CREATE OR REPLACE VIEW pgtraj.job_status AS
SELECT j.id, j.kind, j.args ->> 'table' AS "table", j.args ->> 'model' AS model,
       CASE WHEN j.status = 'running' AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = j.pid)
            THEN 'interrupted' ELSE j.status END AS status,
       j.done, j.total,
       round(100.0 * j.done / nullif(j.total, 0), 1) AS percent,
       (j.progress ->> 'failed')::bigint AS failed,
       (j.progress ->> 'rows_per_second')::float8 AS rows_per_second,
       j.started_at, j.finished_at, j.error, j.created_by
  FROM pgtraj.jobs j;
COMMENT ON VIEW pgtraj.job_status IS 'Batch jobs with progress; status interrupted = its backend ended while running';
GRANT SELECT ON pgtraj.job_status TO pgtraj_user;
