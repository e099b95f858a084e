"""``CALL pgtraj.make_trips(source, target, options)``: any source that describe_source reads (one row per fix
above all) becomes a table of trips, one LINESTRING M per row, cut where the fixes pause and cleaned as
training cleans (core.clean: a profile, thresholds from the data, the discard guard). Every other function
of pgtraj then works on it as it is: embed_table and embedding targets (its key is a bigint identity),
similar and create_hnsw_index, predict_* and score on its geometry column.

Runs with the caller's rights, in one transaction (a failure leaves no table behind); the target is named
as the caller names tables (its search_path) and quoted part by part.
"""

from __future__ import annotations

import json

from pgtraj.core.contract import SOURCE_OPTIONS
from pgtraj.runtime import sources
from pgtraj.runtime.server import InferenceError

BATCH = 500


def make_trips(plpy, source: str, target: str, options: str, replace: bool) -> int:
    from pgtraj.core.clean import CleaningOptions, check_discard
    from pgtraj.core.errors import PgtrajError, config_from_dict
    from pgtraj.core.prepare import clean_read, read_rows
    from pgtraj.core.trajectory import to_wkb

    opts = json.loads(options or "{}")
    if not isinstance(opts, dict):
        raise InferenceError("options must be a JSON object", sqlstate="22023")
    try:
        cleaning = config_from_dict(CleaningOptions, opts.pop("cleaning", {}) or {}, "cleaning")
    except PgtrajError as exc:
        raise InferenceError(exc.message, sqlstate="22023", hint=exc.hint) from None
    unknown = sorted(set(opts) - set(SOURCE_OPTIONS))
    if unknown:
        raise InferenceError(f"unknown options {unknown}", sqlstate="22023",
                             hint=f"source columns {list(SOURCE_OPTIONS)} and cleaning")
    name = _target(plpy, target, replace)
    desc = sources.describe(plpy, source, {k: v for k, v in opts.items() if v is not None})
    id_col, id_type = desc["columns"]["id_column"], desc["id_type"]
    with sources.rows(plpy, desc) as each:
        read = read_rows(each)
    cleaned = clean_read(read, cleaning)
    share = check_discard(cleaned.report, cleaning.max_discard)  # a CleaningError is reported as 22023
    q = plpy.quote_ident
    shape = "LineStringZM" if any(t.z is not None for t, _, _ in read.trajectories) else "LineStringM"  # Z: altitude
    plpy.execute(f"CREATE TABLE {name} (trip_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                 f" {q(id_col)} {id_type} NOT NULL, part integer NOT NULL, entity text, label text,"
                 f" start_at timestamptz NOT NULL, end_at timestamptz NOT NULL, fixes integer NOT NULL,"
                 f" geom {desc['postgis']}.geometry({shape}, 4326) NOT NULL, UNIQUE ({q(id_col)}, part))")
    insert = plpy.prepare(
        f"INSERT INTO {name} ({q(id_col)}, part, entity, label, start_at, end_at, fixes, geom)"
        f" SELECT x.id::{id_type}, x.part, x.entity, x.label, pg_catalog.to_timestamp(x.t0), pg_catalog.to_timestamp(x.t1),"
        f" x.n, {desc['postgis']}.ST_GeomFromWKB(x.w, 4326) FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]),"
        " pg_catalog.unnest($2::pg_catalog.int4[]), pg_catalog.unnest($3::pg_catalog.text[]),"
        " pg_catalog.unnest($4::pg_catalog.text[]), pg_catalog.unnest($5::pg_catalog.float8[]),"
        " pg_catalog.unnest($6::pg_catalog.float8[]), pg_catalog.unnest($7::pg_catalog.int4[]),"
        " pg_catalog.unnest($8::pg_catalog.bytea[])) AS x(id, part, entity, label, t0, t1,"
        " n, w)", ["text[]", "int4[]", "text[]", "text[]", "float8[]", "float8[]", "int4[]", "bytea[]"])
    trips = 0
    for i in range(0, len(cleaned.pieces), BATCH):
        batch = [(str(p.id), p.part, e, read.labels.get(p.id), float(p.t[0]), float(p.t[-1]), len(p), to_wkb(p))
                 for p, e in zip(cleaned.pieces[i:i + BATCH], cleaned.entities[i:i + BATCH])]
        plpy.execute(insert, [list(c) for c in zip(*batch)])
        trips += len(batch)
    plpy.execute(f"ANALYZE {name}")
    plpy.notice(f"pgtraj.make_trips: {trips} trips of {len(read.trajectories)} {desc['shape']} trajectories into"
                f" {name}; cleaning: {cleaned.why}; discarded {share:.2%} of the fixes"
                + (f"; rejected: {dict(read.rejected)}" if read.rejected else ""))
    return trips


def _target(plpy, target: str, replace: bool) -> str:
    try:
        parts = [r["p"] for r in plpy.execute(plpy.prepare(
            "SELECT pg_catalog.quote_ident(p) AS p FROM pg_catalog.unnest(pg_catalog.parse_ident($1)) AS p",
            ["text"]), [target])]
    except plpy.SPIError:
        raise InferenceError(f"{target!r} is not a table name", sqlstate="42602",
                             hint="'trips' or 'schema.trips'") from None
    if not 1 <= len(parts) <= 2:
        raise InferenceError(f"{target!r} is not a table name", sqlstate="42602", hint="'trips' or 'schema.trips'")
    name = ".".join(parts)
    exists = plpy.execute(plpy.prepare("SELECT pg_catalog.to_regclass($1) IS NOT NULL AS e", ["text"]), [name])[0]["e"]
    if exists and not replace:
        raise InferenceError(f"{target} already exists", sqlstate="42P07", hint="pass replace => true to rebuild it")
    if exists:
        plpy.execute(f"DROP TABLE {name}")
    return name
