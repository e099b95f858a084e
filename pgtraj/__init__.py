"""pgtraj: trajectory foundation models that live inside PostgreSQL.

This module stays import-light on purpose: PL/Python imports ``pgtraj.runtime`` inside the database
server, where neither torch nor psycopg is installed.
"""

__version__ = "0.1.0"
