-- Registry and deployments through SQL only, including the errors users will meet. Rows are written
-- directly, as only a superuser can: even then every graph is checked as it is stored.
\set VERBOSITY default
-- a real (if useless) encoder graph: the mean of the continuous features, 8 dimensions
\set encoder 'CAgSDHBndHJhaiB0ZXN0czrHAQo1CgRjb250EgNlbWIiClJlZHVjZU1lYW4qCwoEYXhlc0ABoAEHKg8KCGtlZXBkaW1zGACgAQISB2VuY29kZXJaGgoGdG9rZW5zEhAKDggHEgoKAxIBQgoDEgFUWhcKA2RvdxIQCg4IBxIKCgMSAUIKAxIBVFoaCgZtaW51dGUSEAoOCAcSCgoDEgFCCgMSAVRaHAoEY29udBIUChIIARIOCgMSAUIKAxIBVAoCCAhiFgoDZW1iEg8KDQgBEgkKAxIBQgoCCAhCBAoAEBE='
\set tokenizer '{"format": "pgtraj.tokenizer/1", "config": {}, "vocab": ["8928308280fffff"]}'
INSERT INTO pgtraj.model_registry (name, version, objective, tokenizer, metrics, primary_metric)
VALUES ('taxi', 1, 'next_cell', :'tokenizer', '{"acc@1": 0.31}', 'acc@1'),
       ('taxi', 2, 'next_cell', :'tokenizer', '{"acc@1": 0.42}', 'acc@1'),
       ('taxi', 3, 'next_cell', :'tokenizer', '{"acc@1": 0.37}', 'acc@1');
INSERT INTO pgtraj.model_artifacts (model_id, kind, bytes, sha256)
SELECT id, 'encoder', decode(:'encoder', 'base64'), encode(sha256(decode(:'encoder', 'base64')), 'hex')
  FROM pgtraj.model_registry;
SELECT name, version, embedding_dim FROM pgtraj.models ORDER BY version;  -- read off the encoder

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
INSERT INTO pgtraj.model_artifacts (model_id, kind, bytes, sha256)
SELECT id, 'next_cell', 'not onnx', encode(sha256('not onnx'), 'hex') FROM pgtraj.model_registry WHERE version = 1;
INSERT INTO pgtraj.model_artifacts (model_id, kind, bytes, sha256)
SELECT id, 'next_cell', decode(:'encoder', 'base64'), encode(sha256(decode(:'encoder', 'base64')), 'hex')
  FROM pgtraj.model_registry WHERE version = 1;
INSERT INTO pgtraj.model_registry (name, version, objective, tokenizer) VALUES ('x; DROP TABLE y', 1, 'x', '{}');
INSERT INTO pgtraj.model_registry (name, version, objective, tokenizer, primary_metric)
VALUES ('bus', 1, 'x', '{}', 'acc');
