"""SQLAlchemy / GeoAlchemy2 types for trajectory tables, for users who work through the ORM
(``pip install pgtraj[orm]``). Embedding columns reuse pgvector's own SQLAlchemy type.

>>> class Trip(Base):
...     __tablename__ = "trips"
...     id = mapped_column(Integer, primary_key=True)
...     geom = mapped_column(TrajectoryLine())        # geometry(LineStringM, 4326)
...     trip = mapped_column(TGeomPoint())            # MobilityDB
...     embedding = mapped_column(Vector(128))        # pgvector
>>> reader = TrajectoryReader(conn, source_from_select(select(Trip.id, Trip.geom).where(Trip.id > 10)))
"""

from __future__ import annotations

from geoalchemy2 import Geometry
from pgvector.sqlalchemy import VECTOR as Vector  # noqa: F401  (re-exported: the embedding column type)
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import Select
from sqlalchemy.types import UserDefinedType

from pgtraj.db.readers import QuerySource


def TrajectoryLine(srid: int = 4326) -> Geometry:  # noqa: N802  (reads as a type, like Geometry)
    """``geometry(LineStringM, srid)``: a trajectory with M = epoch seconds."""
    return Geometry("LINESTRINGM", srid=srid, dimension=3)


class TGeomPoint(UserDefinedType):
    """MobilityDB ``tgeompoint``, exchanged as its text form (e.g. '[POINT(1 2)@2008-10-23 02:53:04+00, ...]')."""

    cache_ok = True

    def get_col_spec(self, **kw) -> str:
        return "tgeompoint"


def source_from_select(stmt: Select) -> QuerySource:
    """A reader source from an ORM/Core ``select(id_column, geometry_column)``; bound values stay parameters."""
    compiled = stmt.compile(dialect=postgresql.psycopg.dialect())
    return QuerySource(str(compiled), dict(compiled.params))
