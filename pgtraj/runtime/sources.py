"""What a training source is, found from its columns: a table or a query of trajectories in any of the shapes
people keep them in, and the one SQL that reads it as rows ``(entity, id, w, reason, split, label)`` for
core.prepare. ``pgtraj.describe_source`` returns it (what `pgtraj train` on a client runs) and CALL
pgtraj.train runs it through SPI; both read with the caller's rights.

Shapes (``shape`` in the description):

* ``line``: one row per trajectory, a LINESTRING M/ZM geometry or geography (M = epoch seconds);
* ``temporal``: one row per trajectory, a MobilityDB tgeompoint or tgeogpoint;
* ``points``: one row per fix: an id (who moves), a time (timestamptz, timestamp read as UTC, or epoch
  seconds) and a point geometry/geography or lat/lon columns in degrees. Each id's fixes become one line in
  time order, which cleaning cuts into trips where the fixes pause.
A Z coordinate (LINESTRING ZM, POINT Z) travels with the fixes: altitude is a model feature where there is one.

Columns are found by type and usual names unless named (``SOURCE_OPTIONS``); anything that cannot be
decided, or is missing or of the wrong type, or ids that are NULL, is refused here, before anything is read
in bulk, with the column and the option that fixes it. Every name in the SQL is quoted, every function
schema-qualified: the text runs in the caller's session, whatever its search_path.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

from pgtraj.core.contract import SOURCE_OPTIONS
from pgtraj.runtime.batch import extension_schema, resolve_table
from pgtraj.runtime.server import InferenceError

TIME_TYPES = {"timestamptz": "ts", "timestamp": "ts", "int2": "n", "int4": "n", "int8": "n", "float4": "n",
              "float8": "n", "numeric": "n"}
NUMBER_TYPES = ("int2", "int4", "int8", "float4", "float8", "numeric")
GEOMETRY_TYPES = ("geometry", "geography")
TEMPORAL_TYPES = ("tgeompoint", "tgeogpoint")
# usual names, tried when a column is not named and its type alone does not decide
LAT_NAMES, LON_NAMES = ("lat", "latitude"), ("lon", "lng", "long", "longitude")
TIME_NAMES = ("ts", "time", "timestamp", "datetime", "t", "epoch", "ts_epoch")
_QUERY = re.compile(r"^\s*\(?\s*(select|with|values|table)\b", re.IGNORECASE)


def is_query(source: str) -> bool:
    return bool(_QUERY.match(source or ""))


def describe(plpy, source: str, opts: dict) -> dict:
    """The source's shape, the columns each role is read from, and ``query``: the SQL of its rows."""
    unknown = sorted(set(opts) - set(SOURCE_OPTIONS))
    if unknown:
        raise InferenceError(f"unknown source options {unknown}", sqlstate="22023", hint=f"known: {list(SOURCE_OPTIONS)}")
    q = plpy.quote_ident
    if is_query(source):
        relation, frm, what = None, f"({source.strip().rstrip(';')}) AS s", "the query"
    else:
        _, relation = resolve_table(plpy, source)
        frm, what = f"{relation} AS s", relation
    res = plpy.execute(f"SELECT * FROM {frm} LIMIT 0")
    types = dict(zip(res.colnames(), _type_names(plpy, res.coltypes())))
    named = {k: v for k, v in opts.items() if v is not None}
    for option, column in named.items():
        if column not in types:
            raise InferenceError(f"{what} has no column {column!r} ({option})", sqlstate="42703",
                                 hint=f"its columns: {', '.join(types)}")
    postgis = extension_schema(plpy, "postgis")
    found = _geometry(plpy, types, named, frm, what, postgis)
    cols = {"traj_column": found[0]} if found else {}
    shape, with_z = None, False
    if found:
        shape, with_z = found[1].removesuffix("_z"), found[1].endswith("_z")
    else:
        lat = named.get("lat_column") or _by_name(types, LAT_NAMES, NUMBER_TYPES)
        lon = named.get("lon_column") or _by_name(types, LON_NAMES, NUMBER_TYPES)
        if not (lat and lon):
            raise InferenceError(f"{what} has no trajectory column: no geometry, geography, tgeompoint or tgeogpoint"
                                 " column, and no lat/lon columns", sqlstate="42703",
                                 hint="name them: traj_column, or lat_column and lon_column (with time_column and"
                                      f" id_column for one row per fix); its columns: {', '.join(types)}")
        for option, col in (("lat_column", lat), ("lon_column", lon)):
            if types[col] not in NUMBER_TYPES:
                raise InferenceError(f"{what}.{col} ({option}) is {types[col]}, not a number of degrees",
                                     sqlstate="42804")
        cols.update(lat_column=lat, lon_column=lon)
        shape = "points"
    if shape == "points":
        cols["time_column"] = _time_column(types, named, what)
        if not named.get("id_column"):
            raise InferenceError(f"{what} has one row per fix: name the column that says whose fix it is",
                                 sqlstate="42703",
                                 hint="id_column (--id-column): a vehicle, vessel, person or animal id; candidates:"
                                      f" {', '.join(c for c, t in types.items() if t not in GEOMETRY_TYPES) or 'none'}")
        cols["id_column"] = named["id_column"]
    else:
        cols["id_column"] = named.get("id_column") or _default_id(plpy, relation, types)
    for option in ("entity_column", "split_column", "label_column"):
        if named.get(option):
            cols[option] = named[option]
    if "split_column" not in cols and types.get("split") == "text":
        cols["split_column"] = "split"  # what pgtraj load writes; an explicit split_column names another
    counts = _check_rows(plpy, frm, what, cols, shape, q)
    query = _points_query(q, frm, cols, types, postgis, with_z) if shape == "points" else \
        _rows_query(q, frm, cols, types, postgis)
    return {"source": relation or "query", "shape": shape, "columns": cols, "id_type": types[cols["id_column"]],
            "postgis": postgis, **counts, "query": query}


def summary(desc: dict) -> str:
    """What a description says of the source, as the training log shows it (client and server alike)."""
    cols = ", ".join(f"{k.removesuffix('_column')} {v}" for k, v in desc["columns"].items())
    skipped = (f", {desc['incomplete_fixes']:,} fixes without time or position skipped"
               if desc["incomplete_fixes"] else "")
    return f"reading {desc['source']} ({desc['shape']}: {cols}; {desc['rows']:,} rows{skipped})"


@contextmanager
def rows(plpy, desc: dict, batch: int = 500):
    """The described source's rows as core.prepare reads them, through an SPI cursor that is closed on the
    way out (before anything commits or rolls back: an open cursor would pin its portal)."""
    cursor = plpy.cursor(desc["query"])

    def each():
        while fetched := cursor.fetch(batch):
            for r in fetched:
                yield r["entity"], r["id"], r["w"], r["reason"], r["split"], r["label"]

    try:
        yield each()
    finally:
        cursor.close()


def _type_names(plpy, oids) -> list[str]:
    rows = plpy.execute(plpy.prepare("SELECT o.i, t.typname FROM pg_catalog.unnest($1::pg_catalog.oid[])"
                                     " WITH ORDINALITY AS o(oid, i) JOIN pg_catalog.pg_type t ON t.oid = o.oid"
                                     " ORDER BY o.i", ["oid[]"]), [list(oids)])
    return [r["typname"] for r in rows]


def _by_name(types: dict, names: tuple, allowed: tuple) -> str | None:
    lower = {c.lower(): c for c, t in types.items() if t in allowed}
    return next((lower[n] for n in names if n in lower), None)


def _geometry(plpy, types, named, frm, what, postgis) -> tuple[str, str] | None:
    """(column, 'line' | 'points' | 'temporal') of the trajectory column, or None when there is none."""
    col = named.get("traj_column")
    if col is None:
        cands = [c for c, t in types.items() if t in GEOMETRY_TYPES + TEMPORAL_TYPES]
        if len(cands) > 1:
            raise InferenceError(f"{what} has several trajectory columns ({', '.join(cands)})", sqlstate="42P09",
                                 hint="name one: traj_column (--traj-column)")
        if not cands:
            return None
        col = cands[0]
    typ = types[col]
    if typ in TEMPORAL_TYPES:
        return col, "temporal"
    if typ not in GEOMETRY_TYPES:
        raise InferenceError(f"{what}.{col} (traj_column) is {typ}, not a trajectory", sqlstate="42804",
                             hint="a LINESTRING M geometry (M = epoch seconds), a point geometry with a time column,"
                                  " or a tgeompoint")
    sample = plpy.execute(
        f"SELECT DISTINCT {postgis}.ST_GeometryType(x.g::{postgis}.geometry) AS k,"
        f" {postgis}.ST_Zmflag(x.g::{postgis}.geometry) IN (2, 3) AS z FROM (SELECT"
        f" s.{plpy.quote_ident(col)} AS g FROM {frm} WHERE s.{plpy.quote_ident(col)} IS NOT NULL LIMIT 1000) x")
    kinds = {r["k"] for r in sample}
    if kinds <= {"ST_Point"} and kinds:
        return col, "points_z" if all(r["z"] for r in sample) else "points"
    if kinds <= {"ST_LineString"}:
        return col, "line"
    raise InferenceError(f"{what}.{col} holds {', '.join(sorted(kinds))}: neither one LINESTRING M per trajectory"
                         " nor one POINT per fix", sqlstate="42804",
                         hint="turn it into one of them, e.g. with a query source (ST_Dump, pgtraj.line)")


def _time_column(types, named, what) -> str:
    col = named.get("time_column")
    if col is None:
        stamps = [c for c, t in types.items() if TIME_TYPES.get(t) == "ts"]
        col = stamps[0] if len(stamps) == 1 else _by_name(types, TIME_NAMES, tuple(TIME_TYPES))
        if col is None:
            raise InferenceError(
                f"{what} has one row per fix but no time column" + (f" it can tell apart ({', '.join(stamps)})"
                                                                      if stamps else ""),
                sqlstate="42703", hint="name it: time_column (--time-column): timestamptz, timestamp (read as UTC)"
                                       " or epoch seconds")
    if types[col] not in TIME_TYPES:
        raise InferenceError(f"{what}.{col} (time_column) is {types[col]}, not a time", sqlstate="42804",
                             hint="timestamptz, timestamp (read as UTC) or a number of epoch seconds; convert it in a"
                                  " query source, e.g. to_timestamp(col, 'YYYY-MM-DD HH24:MI:SS') AS ts")
    return col


def _default_id(plpy, relation, types) -> str:
    if relation is not None:
        key = plpy.execute(plpy.prepare(
            "SELECT a.attname FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid"
            " AND a.attnum = i.indkey[0] WHERE i.indrelid = $1::pg_catalog.regclass AND i.indisprimary"
            " AND i.indnatts = 1", ["text"]), [relation])
        if key.nrows():
            return key[0]["attname"]
    if "id" in types:
        return "id"
    if relation is None:
        return next(iter(types))  # a query's first column, as the documented (id, trajectory, ...) order has it
    raise InferenceError(f"{relation} has no primary key and no id column", sqlstate="42703",
                         hint="name the trajectory's id: id_column (--id-column)")


def _check_rows(plpy, frm, what, cols, shape, q) -> dict:
    """One pass over the source before the real read: NULL ids are refused (they would merge unrelated
    fixes or trips into one); fixes without a time or a position are counted, and skipped."""
    missing = ([cols["time_column"]] + ([cols["traj_column"]] if "traj_column" in cols
                                        else [cols["lat_column"], cols["lon_column"]])) if shape == "points" else []
    incomplete = " OR ".join(f"s.{q(c)} IS NULL" for c in missing) or "false"
    row = plpy.execute(f"SELECT pg_catalog.count(*) AS n, pg_catalog.count(*) FILTER (WHERE s.{q(cols['id_column'])}"
                       f" IS NULL) AS null_ids, pg_catalog.count(*) FILTER (WHERE {incomplete}) AS incomplete"
                       f" FROM {frm}")[0]
    if row["null_ids"]:
        raise InferenceError(f"{row['null_ids']} of the {row['n']} rows of {what} have a NULL id ({cols['id_column']})",
                             sqlstate="23502", hint="fill them in, or read a query that leaves them out: SELECT ..."
                                                    f" WHERE {q(cols['id_column'])} IS NOT NULL")
    if not row["n"]:
        raise InferenceError(f"{what} has no rows", sqlstate="02000", hint="check the table/query and its WHERE clause")
    return {"rows": row["n"], "incomplete_fixes": row["incomplete"]}


def _optional(q, cols, option, agg=False) -> str:
    if option not in cols:
        return "NULL::pg_catalog.text"
    col = f"s.{q(cols[option])}::pg_catalog.text"
    return f"pg_catalog.min({col})" if agg else col


def _rows_query(q, frm, cols, types, postgis) -> str:
    traj = f"s.{q(cols['traj_column'])}"
    typ = types[cols["traj_column"]]
    if typ == "geography":
        traj += f"::{postgis}.geometry"
    elif typ == "tgeogpoint":
        traj = f"pgtraj.line({traj})"
    return (f"SELECT {_optional(q, cols, 'entity_column')} AS entity, s.{q(cols['id_column'])}::pg_catalog.text AS id,"
            f" r.w, r.reason, {_optional(q, cols, 'split_column')} AS split, {_optional(q, cols, 'label_column')} AS label"
            f" FROM {frm}, pgtraj._wkb_or_reason({traj}) AS r ORDER BY 2")


def _points_query(q, frm, cols, types, postgis, with_z: bool) -> str:
    t = f"s.{q(cols['time_column'])}"
    epoch = (f"pg_catalog.date_part('epoch', {t})" if TIME_TYPES[types[cols['time_column']]] == "ts"
             else f"{t}::pg_catalog.float8")
    if "traj_column" in cols:
        g = f"s.{q(cols['traj_column'])}::{postgis}.geometry"
        x, y, srid = f"{postgis}.ST_X({g})", f"{postgis}.ST_Y({g})", f"pg_catalog.max({postgis}.ST_SRID({g}))"
        if with_z:  # the altitude travels as Z: ST_MakePoint(x, y, z, m) makes a POINT ZM
            y += f", {postgis}.ST_Z({g})"
        present = f"s.{q(cols['traj_column'])} IS NOT NULL"
    else:
        x, y, srid = f"s.{q(cols['lon_column'])}", f"s.{q(cols['lat_column'])}", "4326"
        present = f"{x} IS NOT NULL AND {y} IS NOT NULL"
    entity = _optional(q, cols, "entity_column", agg=True) if "entity_column" in cols \
        else f"s.{q(cols['id_column'])}::pg_catalog.text"
    # the line keeps the points' SRID; _wkb_or_reason transforms it to WGS84 (or says why it cannot)
    return (f"SELECT g.entity, g.id, r.w, r.reason, g.split, g.label FROM (SELECT {entity} AS entity,"
            f" s.{q(cols['id_column'])}::pg_catalog.text AS id, {_optional(q, cols, 'split_column', agg=True)} AS split,"
            f" {_optional(q, cols, 'label_column', agg=True)} AS label,"
            f" {postgis}.ST_SetSRID({postgis}.ST_MakeLine({postgis}.{'ST_MakePoint' if with_z else 'ST_MakePointM'}"
            f"({x}, {y}, {epoch}) ORDER BY {t}),"
            f" {srid}) AS line FROM {frm} WHERE {t} IS NOT NULL AND {present} GROUP BY s.{q(cols['id_column'])}) AS g,"
            f" pgtraj._wkb_or_reason(g.line) AS r ORDER BY g.id")
