"""One module per served graph kind (core.contract.GRAPHS): what its SQL functions run, on numpy and
onnxruntime, from a model resolved in SQL (models.Ref)."""
