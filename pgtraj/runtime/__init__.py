"""The in-database runtime: what PL/Python imports inside PostgreSQL. Depends on numpy, onnxruntime and h3
(and pgtraj.core) only, never torch or psycopg. The SQL functions in sql/ are thin wrappers whose bodies
reach ``pgtraj.runtime.api``; importing this package alone loads nothing.
"""
