"""Reading trajectories out of PostgreSQL: PostGIS LINESTRING M/ZM, point tables, MobilityDB temporal points,
or any query. Streams through a server-side cursor (tables larger than memory), shows progress, and
reports every row it could not use with the reason, so nothing is dropped silently.

>>> src = PointSource("geolife.points", id="traj_id", time="ts", lat="lat", lon="lon")
>>> reader = TrajectoryReader(conn, src)
>>> for traj in reader: ...
>>> reader.report.rejected        # Counter({'no M (time) coordinate': 2, ...})

Every identifier goes through psycopg.sql.Identifier. A QuerySource runs the caller's own SQL with the
caller's privileges, exactly as psql would: it is a query, not a name, and is never built from values.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import psycopg
from psycopg import sql
from tqdm import tqdm

from pgtraj.core.errors import SourceError, TrajectoryError
from pgtraj.core.trajectory import Trajectory, from_wkb


def _table(name: str | tuple[str, ...]) -> sql.Identifier:
    parts = tuple(name.split(".")) if isinstance(name, str) else tuple(name)
    if not 1 <= len(parts) <= 2 or not all(parts):
        raise SourceError(f"table name {name!r} is not 'table' or 'schema.table'")
    return sql.Identifier(*parts)


@dataclass(frozen=True)
class LineStringSource:
    """One row per trajectory: a LINESTRING M or ZM whose M is epoch seconds (``ST_IsValidTrajectory``)."""

    table: str
    geom: str = "geom"
    id: str = "id"

    def query(self, conn) -> sql.Composable:
        return sql.SQL("SELECT {id}, {g} FROM {t}").format(
            id=sql.Identifier(self.id), g=sql.Identifier(self.geom), t=_table(self.table))


@dataclass(frozen=True)
class PointSource:
    """One row per fix: id, time (timestamptz, timestamp as UTC, or epoch seconds) and either a point geometry
    column or lat/lon columns in degrees. Grouped by id and ordered by time in the database."""

    table: str
    id: str = "id"
    time: str = "ts"
    geom: str | None = None
    lat: str | None = None
    lon: str | None = None

    def query(self, conn) -> sql.Composable:
        t = sql.Identifier(self.time)
        if self.geom:
            g = sql.Identifier(self.geom)
            x, y, srid = sql.SQL("ST_X({})").format(g), sql.SQL("ST_Y({})").format(g), sql.SQL("max(ST_SRID({}))").format(g)
            present = sql.SQL("{} IS NOT NULL").format(g)
        elif self.lat and self.lon:
            x, y, srid = sql.Identifier(self.lon), sql.Identifier(self.lat), sql.SQL("4326")
            present = sql.SQL("{} IS NOT NULL AND {} IS NOT NULL").format(x, y)
        else:
            raise SourceError("PointSource needs geom=... or both lat=... and lon=...")
        epoch = _epoch_expr(conn, self.table, self.time)
        # the line keeps the points' SRID; the reader transforms the whole line to WGS84 once
        return sql.SQL(
            "SELECT {id}, ST_SetSRID(ST_MakeLine(ST_MakePointM({x}, {y}, {epoch}) ORDER BY {t}), {srid})"
            " FROM {tbl} WHERE {t} IS NOT NULL AND {present} GROUP BY {id}").format(
            id=sql.Identifier(self.id), x=x, y=y, epoch=epoch, t=t, srid=srid, tbl=_table(self.table),
            present=present)

    def incomplete_rows(self, conn) -> int:
        """Fixes without a time or a position: not part of any trajectory, so counted and reported."""
        cols = [self.time] + ([self.geom] if self.geom else [self.lat, self.lon])
        cond = sql.SQL(" OR ").join(sql.SQL("{} IS NULL").format(sql.Identifier(c)) for c in cols)
        return conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(_table(self.table), cond)).fetchone()[0]


@dataclass(frozen=True)
class TemporalSource:
    """MobilityDB: one row per trajectory in a tgeompoint or tgeogpoint column (any subtype)."""

    table: str
    temporal: str = "trip"
    id: str = "id"

    def query(self, conn) -> sql.Composable:
        col = sql.Identifier(self.temporal)
        typ = _column_type(conn, self.table, self.temporal)
        if typ == "tgeogpoint":
            col = sql.SQL("{}::tgeompoint").format(col)
        elif typ != "tgeompoint":
            raise SourceError(f"column {self.temporal!r} of {self.table} is {typ}, not tgeompoint or tgeogpoint")
        # instants, sequences and sequence sets all become one LINESTRING M ordered by time
        return sql.SQL("SELECT {id}, (SELECT ST_MakeLine(d.geom ORDER BY ST_M(d.geom))"
                       " FROM ST_DumpPoints({col}::geometry) d) FROM {t}").format(
            id=sql.Identifier(self.id), col=col, t=_table(self.table))


@dataclass(frozen=True)
class QuerySource:
    """Any query returning two columns: an id and a LINESTRING M (geometry, EWKB or EWKT; M = epoch seconds).
    Values go in ``params`` (psycopg placeholders: %s or %(name)s), never into the text."""

    sql_text: str
    params: tuple | dict | None = None

    def query(self, conn) -> sql.Composable:
        return sql.SQL(self.sql_text.strip().rstrip(";"))


def source_error(exc: psycopg.Error) -> SourceError:
    """What the server said about a source (pgtraj.describe_source, make_trips), as the client reports it."""
    message = (exc.diag.message_primary if exc.diag else None) or str(exc).strip()
    return SourceError(message.removeprefix("pgtraj: "), hint=exc.diag.message_hint if exc.diag else None)


def _column_type(conn, table: str, column: str) -> str:
    cur = conn.execute(sql.SQL("SELECT {} FROM {} LIMIT 0").format(sql.Identifier(column), _table(table)))
    oid = cur.description[0].type_code
    return conn.execute("SELECT typname FROM pg_type WHERE oid = %s", [oid]).fetchone()[0]


def _epoch_expr(conn, table: str, column: str) -> sql.Composable:
    typ = _column_type(conn, table, column)
    col = sql.Identifier(column)
    if typ in ("timestamptz", "timestamp"):
        return sql.SQL("extract(epoch FROM {})::float8").format(col)
    if typ in ("int2", "int4", "int8", "float4", "float8", "numeric"):
        return sql.SQL("{}::float8").format(col)
    raise SourceError(f"time column {column!r} of {table} is {typ}; expected timestamptz, timestamp or epoch seconds")


@dataclass
class ReadReport:
    trajectories: int = 0
    points: int = 0
    rejected: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> first few ids
    incomplete_fixes: int = 0

    def reject(self, reason: str, traj_id) -> None:
        self.rejected[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < 5:
            ids.append(traj_id)

    def summary(self) -> str:
        parts = [f"{self.trajectories} trajectories, {self.points} points read"]
        if self.incomplete_fixes:
            parts.append(f"{self.incomplete_fixes} fixes without time or position skipped")
        parts += [f"{n} rejected: {reason} (e.g. ids {self.examples[reason]})" for reason, n in self.rejected.items()]
        return "; ".join(parts)


class TrajectoryReader:
    """Iterate over the trajectories of a source. ``on_error='skip'`` (default) rejects bad rows into
    ``report``; ``'raise'`` stops at the first one with a TrajectoryError naming it. ``srid`` is assumed
    for geometries that have none (SRID 0); ``time_unit='ms'`` reads M in milliseconds."""

    def __init__(self, conn: psycopg.Connection, source, *, batch_size: int = 500, time_unit: str = "s",
                 on_error: str = "skip", srid: int | None = None, progress: bool = False):
        if time_unit not in ("s", "ms"):
            raise SourceError(f"time_unit must be 's' or 'ms', not {time_unit!r}")
        if on_error not in ("skip", "raise"):
            raise SourceError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
        self.conn, self.source, self.batch_size = conn, source, batch_size
        self.time_unit, self.on_error, self.progress = time_unit, on_error, progress
        self.srid = srid
        self.report = ReadReport()

    def _rows_query(self) -> sql.Composable:
        # checks that must not abort the whole query (ST_Transform raises on SRID 0) happen per row here
        # ::geometry also accepts EWKB bytea (what GeoAlchemy2 selects) and EWKT text from a QuerySource
        g = sql.SQL("q.g::geometry") if self.srid is None else sql.SQL(
            "CASE WHEN ST_SRID(q.g::geometry) = 0 THEN ST_SetSRID(q.g::geometry, {}) ELSE q.g::geometry END"
        ).format(sql.Literal(int(self.srid)))
        return sql.SQL(
            "SELECT r.id, r.g IS NULL, ST_IsEmpty(r.g), ST_SRID(r.g), ST_GeometryType(r.g), ST_Zmflag(r.g),"
            " CASE WHEN NOT ST_IsEmpty(r.g) AND ST_SRID(r.g) <> 0 AND ST_GeometryType(r.g) = 'ST_LineString'"
            "      AND ST_Zmflag(r.g) IN (1, 3) THEN ST_AsBinary(CASE WHEN ST_Zmflag(r.g) = 3"
            "      THEN ST_Transform(r.g, 4326) ELSE ST_Force3DM(ST_Transform(r.g, 4326)) END) END"
            # OFFSET 0 keeps the planner from pasting the (costly) geometry expression into each use of r.g
            " FROM (SELECT q.id, {g} AS g FROM ({inner}) AS q(id, g) OFFSET 0) AS r").format(
            g=g, inner=self.source.query(self.conn))

    def __iter__(self) -> Iterator[Trajectory]:
        try:
            query = self._rows_query()
            if isinstance(self.source, PointSource):
                self.report.incomplete_fixes = self.source.incomplete_rows(self.conn)
        except psycopg.Error as exc:
            raise SourceError(f"cannot read trajectories from {self.source}: {str(exc).strip()}") from exc
        bar = tqdm(unit=" traj", disable=not self.progress, desc="reading")
        with self.conn.transaction(), self.conn.cursor(name="pgtraj_reader", binary=True) as cur:
            try:
                cur.itersize = self.batch_size
                cur.execute(query, getattr(self.source, "params", None))
                rows = iter(cur)
                for row in rows:
                    traj = self._convert(*row)
                    bar.update(1)
                    if traj is not None:
                        yield traj
            except psycopg.Error as exc:
                raise SourceError(f"reading {self.source} failed: {str(exc).strip()}") from exc
        bar.close()
        if self.report.trajectories == 0 and not self.report.rejected:
            raise SourceError(f"{self.source} returned no trajectories",
                              hint="check the table/query and its WHERE clause")

    def _convert(self, traj_id, is_null, is_empty, srid, gtype, zm, wkb) -> Trajectory | None:
        reason = None
        if is_null:
            reason = "NULL geometry"
        elif is_empty:
            reason = "empty geometry"
        elif srid == 0:
            reason = "no SRID (read with srid=..., or ST_SetSRID in the table)"
        elif gtype != "ST_LineString":
            reason = "not a LINESTRING"
        elif zm not in (1, 3):
            reason = "no M (time) coordinate"
        if reason is not None:
            return self._reject(TrajectoryError(f"trajectory {traj_id!r}: {reason}", traj_id=traj_id, reason=reason))
        try:
            traj = from_wkb(traj_id, wkb, time_scale=1.0 if self.time_unit == "s" else 0.001)
        except TrajectoryError as exc:
            return self._reject(exc)
        self.report.trajectories += 1
        self.report.points += len(traj)
        return traj

    def _reject(self, exc: TrajectoryError):
        if self.on_error == "raise":
            raise exc
        self.report.reject(exc.reason, exc.traj_id)
        return None

