-- 0004_training_from_sql: training runs started inside the database (CALL pgtraj.train, pg_cron).

-- The backend running a training run: a 'running' row whose backend has gone was interrupted.
ALTER TABLE pgtraj.training_runs ADD COLUMN pid integer;
-- What the run was asked to do with its model: 'auto' (deploy if better), 'always' or 'never'; and what
-- it did, e.g. 'deployed v3 (val_loss 1.21 < 1.34 of v2)'.
ALTER TABLE pgtraj.training_runs ADD COLUMN deploy_policy text;
ALTER TABLE pgtraj.training_runs ADD COLUMN outcome text;
