"""The ORM types against a real database: GeoAlchemy2 LINESTRING M, MobilityDB tgeompoint, pgvector."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
from sqlalchemy import Integer, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column

from pgtraj.db.orm import TGeomPoint, TrajectoryLine, Vector, source_from_select
from pgtraj.db.readers import TemporalSource, TrajectoryReader


class Base(DeclarativeBase):
    pass


class Trip(Base):
    __tablename__ = "orm_trips"
    id = mapped_column(Integer, primary_key=True)
    geom = mapped_column(TrajectoryLine())
    trip = mapped_column(TGeomPoint())
    embedding = mapped_column(Vector(3))


@pytest.fixture
def engine(db):
    eng = create_engine(db.replace("postgresql://", "postgresql+psycopg://"))
    yield eng
    eng.dispose()


def test_orm_table_round_trip_and_reader(engine, db):
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        for i in range(1, 4):
            s.add(Trip(id=i, geom=f"SRID=4326;LINESTRING M (116.3 39.9 {1224730384 + i}, 116.31 39.91 {1224730390 + i})",
                       trip=f"[POINT(116.3 39.9)@2008-10-23 02:53:0{4 + i}+00, POINT(116.31 39.91)@2008-10-23 02:53:1{i}+00]",
                       embedding=np.array([i, 0.5, 1.0])))
        s.commit()
        col_types = dict(s.execute(text("SELECT column_name, udt_name FROM information_schema.columns"
                                         " WHERE table_name = 'orm_trips'")).all())
        assert col_types == {"id": "int4", "geom": "geometry", "trip": "tgeompoint", "embedding": "vector"}
        assert s.execute(text("SELECT type FROM geometry_columns WHERE f_table_name = 'orm_trips'")).scalar() == "LINESTRINGM"
        nearest = s.scalars(select(Trip.id).order_by(Trip.embedding.l2_distance([2, 0.5, 1.0])).limit(1)).one()
        assert nearest == 2
    stmt = select(Trip.id, Trip.geom).where(Trip.id >= 2).order_by(Trip.id)
    src = source_from_select(stmt)
    assert list(src.params.values()) == [2] and "%(" in src.sql_text  # the value travels as a parameter
    with psycopg.connect(db) as conn:
        got = list(TrajectoryReader(conn, src))
        assert [t.id for t in got] == [2, 3] and got[0].t.tolist() == [1224730386.0, 1224730392.0]
        trips = list(TrajectoryReader(conn, TemporalSource("orm_trips"), srid=4326))
        assert sorted(t.id for t in trips) == [1, 2, 3]
