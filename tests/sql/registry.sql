-- Registry and deployments through SQL only, including the errors users will meet.
\set VERBOSITY default
INSERT INTO pgtraj.model_registry (name, version, objective, tokenizer, metrics, primary_metric)
VALUES ('taxi', 1, 'next_cell', '{}', '{"acc@1": 0.31}', 'acc@1'),
       ('taxi', 2, 'next_cell', '{}', '{"acc@1": 0.42}', 'acc@1'),
       ('taxi', 3, 'next_cell', '{}', '{"acc@1": 0.37}', 'acc@1');
INSERT INTO pgtraj.model_artifacts (model_id, kind, bytes, sha256)
SELECT id, 'encoder', convert_to('graph ' || version, 'UTF8'),
       encode(sha256(convert_to('graph ' || version, 'UTF8')), 'hex')
  FROM pgtraj.model_registry;

SELECT name, version, strategy FROM pgtraj.deploy('taxi');
SELECT name, version, strategy FROM pgtraj.deploy('taxi', 'best');
SELECT name, version, strategy FROM pgtraj.deploy('taxi', version => '1', note => 'pin');
SELECT name, version, strategy, note FROM pgtraj.deploy('taxi', 'rollback');
SELECT name, version, strategy FROM pgtraj.deploy('taxi', '1');
SELECT name, version, strategy FROM pgtraj.deploy('taxi', '1');
SELECT name, version, deployed, primary_metric_value, artifacts, artifact_bytes FROM pgtraj.models ORDER BY version;

-- errors
SELECT * FROM pgtraj.deploy('bus');
SELECT * FROM pgtraj.deploy('taxi', '9');
SELECT * FROM pgtraj.deploy('taxi', 'yesterday');
SELECT * FROM pgtraj.deploy('taxi', NULL);
\set VERBOSITY terse
INSERT INTO pgtraj.model_artifacts (model_id, kind, bytes, sha256)
SELECT id, 'next_cell', '\x00', 'not-the-digest' FROM pgtraj.model_registry WHERE version = 1;
INSERT INTO pgtraj.model_registry (name, version, objective, tokenizer) VALUES ('x; DROP TABLE y', 1, 'x', '{}');
INSERT INTO pgtraj.model_registry (name, version, objective, tokenizer, primary_metric)
VALUES ('bus', 1, 'x', '{}', 'acc');
