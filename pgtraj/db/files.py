"""Loading trajectory files into a point table (``pgtraj load file``): CSV, Parquet or GPX, one row per fix,
columns as the file has them (typed from the data), plus ``geom geometry(Point, 4326)`` built from the
latitude/longitude columns, and an index on (id, time) when those are named. What the rest of pgtraj reads
as it is: `pgtraj train --table <table> --id-column <id>` finds the time and position itself.

GPX (tracks of GPS devices and apps): one row per ``trkpt`` with ``track`` (file name, and the track's
number when a file has several), ``ts``, ``lat``, ``lon`` and ``ele`` when present.
"""

from __future__ import annotations

import io
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from tqdm import tqdm

from pgtraj.core.errors import SourceError

FORMATS = ("csv", "parquet", "gpx")
# Arrow type (as str()) -> PostgreSQL type; anything else is loaded as text
_PG_TYPES = {"int8": "smallint", "int16": "smallint", "int32": "integer", "int64": "bigint", "uint8": "smallint",
             "uint16": "integer", "uint32": "bigint", "float": "real", "double": "double precision",
             "bool": "boolean", "string": "text", "large_string": "text", "date32[day]": "date"}
_LAT, _LON = ("lat", "latitude"), ("lon", "lng", "long", "longitude")


@dataclass
class FileLoad:
    table: str
    rows: int
    columns: dict[str, str]      # name -> PostgreSQL type
    seconds: float


def read_file(path: str | Path, fmt: str | None = None, time_format: str | None = None, time_column=None):
    """The file as an Arrow table. CSV column types are inferred (ISO timestamps become timestamps);
    ``time_format`` (strptime, e.g. '%d/%m/%Y %H:%M:%S') parses ``time_column`` when it is not ISO."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise SourceError(f"file {path} not found")
    fmt = fmt or next((f for f in FORMATS if path.name.lower().removesuffix(".gz").endswith("." + f)), None)
    if fmt not in FORMATS:
        raise SourceError(f"cannot tell the format of {path.name}", hint=f"pass --format, one of {FORMATS}")
    if fmt == "parquet":
        return pq.read_table(path)
    if fmt == "gpx":
        return _read_gpx(path)
    import pyarrow as pa
    import pyarrow.compute as pc

    zoned = bool(time_format) and "%z" in time_format
    options = None
    if time_format and time_column:  # a time without an offset is UTC, as everywhere in pgtraj
        options = pacsv.ConvertOptions(column_types={time_column: pa.timestamp("s", tz="UTC" if zoned else None)},
                                       timestamp_parsers=[time_format])
    try:
        table = pacsv.read_csv(path, convert_options=options)
    except Exception as exc:  # pyarrow raises ArrowInvalid with the line and the value
        raise SourceError(f"cannot read {path.name} as CSV: {exc}",
                          hint="--time-format '%d/%m/%Y %H:%M:%S' (strptime; UTC unless it has %z) for times"
                               " that are not ISO 8601") from None
    if options is not None and not zoned:
        i = table.column_names.index(time_column)
        table = table.set_column(i, time_column, pc.assume_timezone(table[time_column], "UTC"))
    return table


def _read_gpx(path: Path):
    import pyarrow as pa

    ns = {"g": "http://www.topografix.com/GPX/1/1"}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise SourceError(f"{path.name} is not GPX: {exc}") from None
    if root.tag.startswith("{http://www.topografix.com/GPX/1/0}"):
        ns = {"g": "http://www.topografix.com/GPX/1/0"}
    cols: dict[str, list] = {"track": [], "ts": [], "lat": [], "lon": [], "ele": []}
    tracks = root.findall("g:trk", ns)
    for i, trk in enumerate(tracks):
        name = path.stem if len(tracks) == 1 else f"{path.stem}#{i + 1}"
        for pt in trk.iterfind("g:trkseg/g:trkpt", ns):
            when, ele = pt.find("g:time", ns), pt.find("g:ele", ns)
            cols["track"].append(name)
            cols["ts"].append(None if when is None else when.text.strip())
            cols["lat"].append(float(pt.get("lat")))
            cols["lon"].append(float(pt.get("lon")))
            cols["ele"].append(None if ele is None else float(ele.text))
    if not cols["track"]:
        raise SourceError(f"{path.name} has no track points (trk/trkseg/trkpt)")
    ts = pa.array(cols.pop("ts"), pa.string())
    import pyarrow.compute as pc

    table = pa.table({**{k: pa.array(v) for k, v in cols.items()},
                      "ts": pc.cast(pc.strptime(pc.replace_substring_regex(ts, r"\.\d+", ""), "%Y-%m-%dT%H:%M:%S%z",
                                                "s"), pa.timestamp("s", tz="UTC"))})
    return table.select(["track", "ts", "lat", "lon", "ele"])


def load_file(conn: psycopg.Connection, path: str | Path, table: str, *, fmt: str | None = None,
              id_column: str | None = None, time_column: str | None = None, lat_column: str | None = None,
              lon_column: str | None = None, time_format: str | None = None, replace: bool = False,
              progress: bool = True, log=print) -> FileLoad:
    """Create ``table`` (schema.table) from a file, in one transaction."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    t0 = time.perf_counter()
    data = read_file(path, fmt, time_format, time_column)
    names = data.column_names
    for option, col in (("id_column", id_column), ("time_column", time_column), ("lat_column", lat_column),
                        ("lon_column", lon_column)):
        if col is not None and col not in names:
            raise SourceError(f"{Path(path).name} has no column {col!r} ({option})", hint=f"its columns: {names}")
    lower = {n.lower(): n for n in names}
    lat = lat_column or next((lower[n] for n in _LAT if n in lower), None)
    lon = lon_column or next((lower[n] for n in _LON if n in lower), None)
    types = {}
    for field in data.schema:
        typ = str(field.type)
        if pa.types.is_timestamp(field.type):
            types[field.name] = "timestamptz" if field.type.tz else "timestamp"
        else:
            types[field.name] = _PG_TYPES.get(typ, "text")
            if types[field.name] == "text" and typ not in ("string", "large_string"):
                data = data.set_column(names.index(field.name), field.name, data[field.name].cast(pa.string()))
    parts = table.split(".")
    if not 1 <= len(parts) <= 2 or not all(parts):
        raise SourceError(f"table name {table!r} is not 'table' or 'schema.table'")
    name = sql.Identifier(*parts)
    with conn.transaction():
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [sql.Identifier(*parts).as_string(conn)]).fetchone()[0]
        if exists and not replace:
            raise SourceError(f"{table} already exists", hint="pass --replace to load again (drops the table)")
        if len(parts) == 2:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(parts[0])))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(name))
        conn.execute(sql.SQL("CREATE TABLE {} ({})").format(name, sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in types.items())))
        bar = tqdm(total=data.num_rows, unit=" rows", unit_scale=True, desc="loading", disable=not progress)
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in names)
        with conn.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(name, cols)) as copy:
            for batch in data.to_batches(max_chunksize=100_000):
                buf = io.BytesIO()  # pyarrow writes CSV in C++: no per-row Python
                pacsv.write_csv(pa.Table.from_batches([batch]), buf, pacsv.WriteOptions(include_header=False))
                copy.write(buf.getvalue())
                bar.update(batch.num_rows)
        bar.close()
        if lat and lon:
            conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN geom geometry(Point, 4326) GENERATED ALWAYS AS"
                                 " (ST_SetSRID(ST_MakePoint({}, {}), 4326)) STORED").format(
                name, sql.Identifier(lon), sql.Identifier(lat)))
            types["geom"] = "geometry(Point, 4326)"
        if id_column and time_column:
            conn.execute(sql.SQL("CREATE INDEX ON {} ({}, {})").format(name, sql.Identifier(id_column),
                                                                       sql.Identifier(time_column)))
    conn.execute(sql.SQL("ANALYZE {}").format(name))
    return FileLoad(table, data.num_rows, types, time.perf_counter() - t0)
