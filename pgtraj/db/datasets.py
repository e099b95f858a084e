"""Loading real trajectory datasets into PostGIS/MobilityDB tables (``pgtraj load``).

GeoLife 1.3 (Microsoft Research Asia; see ../shared/data/README.md) becomes, in schema ``geolife``:

* ``points``: one row per fix, as recorded (duplicates and out-of-order times kept: cleaning is the reader's
  job and it reports what it removes), with ``ts timestamptz`` and ``geom geometry(Point, 4326)``;
* ``labels``: transport-mode intervals;
* ``trajectories``: one ``LINESTRING M`` (M = epoch seconds, fixes ordered by time) per original file, with
  its user, time span, point count and split (``core.splits.geolife_split``: chronological per user, and
  ``'unseen'`` for users 120-139, which no training reads);
* ``trips``: the same as MobilityDB ``tgeompoint`` sequences (duplicate timestamps dropped: MobilityDB
  requires strictly increasing time; MobilityDB also normalises each sequence, leaving out fixes that lie
  exactly on the line between their neighbours, which describes the same movement with fewer instants).
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psycopg
from psycopg import sql
from tqdm import tqdm

from pgtraj.core.errors import SourceError
from pgtraj.core.splits import geolife_split


# GeoLife's transport-mode labels as the benchmarks classify them: taxi is driven like a car; airplane,
# boat, run and motorcycle are too rare to learn
GEOLIFE_MODES = {"walk": "walk", "bike": "bike", "bus": "bus", "car": "car", "taxi": "car", "subway": "subway",
                 "train": "train"}


def default_data_dir() -> Path:
    """``$PGTRAJ_DATA``, else ``../shared/data`` beside a source checkout (where CI and developers have it)."""
    import os

    if os.environ.get("PGTRAJ_DATA"):
        return Path(os.environ["PGTRAJ_DATA"])
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def parse_ids(spec: str | None) -> list[int] | None:
    """'0-4,17' -> [0, 1, 2, 3, 4, 17]; None or 'all' -> None (every id)."""
    if not spec or spec == "all":
        return None
    out = []
    for part in spec.split(","):
        a, _, b = part.strip().partition("-")
        try:
            out.extend(range(int(a), int(b or a) + 1))
        except ValueError as exc:
            raise SourceError(f"bad id list {spec!r}", hint="use e.g. 0-9,17") from exc
    return out


@dataclass
class LoadReport:
    schema: str
    points: int = 0
    trajectories: int = 0
    trips: int = 0
    labels: int = 0
    users: int = 0
    seconds: dict = field(default_factory=dict)


def load_geolife(conn: psycopg.Connection, data_dir: str | Path, *, schema: str = "geolife",
                 users: list[int] | None = None, replace: bool = False, progress: bool = True, log=print) -> LoadReport:
    """Load GeoLife into ``schema`` (one transaction: all or nothing), from a folder with points.parquet and
    labels.parquet, or from the official distribution's zip (``Data/<user>/Trajectory/*.plt``, labels.txt)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    data_dir = Path(data_dir)
    if data_dir.suffix.lower() == ".zip":
        zipped = GeoLifeZip(data_dir, users)
        total, batches, label_rows = None, zipped.point_batches(), zipped.labels
    else:
        points_file, labels_file = data_dir / "points.parquet", data_dir / "labels.parquet"
        for f in (points_file, labels_file):
            if not f.exists():
                raise SourceError(f"GeoLife file {f} not found",
                                  hint="pass --path to the folder with points.parquet, or to the GeoLife 1.3 zip")
        pf = pq.ParquetFile(points_file)
        total = pf.metadata.num_rows
        batches = (pf.read_row_group(i, columns=["user_id", "traj_id", "ts", "lat", "lon", "alt_ft"])
                   for i in range(pf.metadata.num_row_groups))
        label_rows = pq.read_table(labels_file).to_pylist()
    s = sql.Identifier(schema)
    report = LoadReport(schema)
    with conn.transaction():
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [f"{schema}.points"]).fetchone()[0]
        if exists and not replace:
            raise SourceError(f"{schema}.points already exists", hint="pass --replace to load again (drops the schema)")
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(s))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(s))
        conn.execute(sql.SQL("""
            CREATE TABLE {s}.points (
                user_id  smallint NOT NULL,
                traj_id  integer NOT NULL,
                ts_epoch bigint NOT NULL,
                lat      double precision NOT NULL,
                lon      double precision NOT NULL,
                alt_ft   real,
                ts       timestamptz GENERATED ALWAYS AS (to_timestamp(ts_epoch)) STORED,
                geom     geometry(Point, 4326) GENERATED ALWAYS AS (ST_SetSRID(ST_MakePoint(lon, lat), 4326)) STORED)
            """).format(s=s))
        t0 = time.perf_counter()
        bar = tqdm(total=total, unit=" fixes", unit_scale=True, desc="points", disable=not progress)
        with conn.cursor().copy(sql.SQL("COPY {}.points (user_id, traj_id, ts_epoch, lat, lon, alt_ft)"
                                        " FROM STDIN (FORMAT csv)").format(s)) as copy:
            for batch in batches:
                bar.update(batch.num_rows)
                if users is not None:
                    batch = batch.filter(pc.is_in(batch["user_id"], pa.array(users, pa.int16())))
                if batch.num_rows:
                    buf = io.BytesIO()  # pyarrow writes CSV in C++: no per-row Python on 18 M rows
                    pacsv.write_csv(batch, buf, pacsv.WriteOptions(include_header=False))
                    copy.write(buf.getvalue())
                    report.points += batch.num_rows
        bar.close()
        report.seconds["copy_points"] = time.perf_counter() - t0
        if report.points == 0:
            raise SourceError(f"no GeoLife points for users {users}", hint="GeoLife 1.3 user ids run from 0 to 139")

        labels = [r for r in label_rows if users is None or r["user_id"] in users]
        conn.execute(sql.SQL("CREATE TABLE {}.labels (user_id smallint, start_ts timestamptz, end_ts timestamptz,"
                             " mode text)").format(s))
        with conn.cursor().copy(sql.SQL("COPY {}.labels FROM STDIN").format(s)) as copy:
            for r in labels:
                copy.write_row((r["user_id"], _ts(r["start_ts"]), _ts(r["end_ts"]), r["mode"]))
        report.labels = len(labels)

        t0 = time.perf_counter()
        log(f"building {schema}.trajectories (LINESTRING M)")
        conn.execute(sql.SQL("""
            CREATE TABLE {s}.trajectories AS
            SELECT traj_id, min(user_id)::smallint AS user_id, min(ts) AS start_ts, max(ts) AS end_ts,
                   count(*)::integer AS n_points, NULL::text AS split,
                   ST_SetSRID(ST_MakeLine(ST_MakePointM(lon, lat, ts_epoch) ORDER BY ts_epoch), 4326)
                       ::geometry(LineStringM, 4326) AS geom
              FROM {s}.points GROUP BY traj_id""").format(s=s))
        conn.execute(sql.SQL("ALTER TABLE {s}.trajectories ADD PRIMARY KEY (traj_id)").format(s=s))
        ids, user, start = (np.array(c) for c in zip(*conn.execute(sql.SQL(
            "SELECT traj_id, user_id, extract(epoch FROM start_ts) FROM {}.trajectories").format(s)).fetchall()))
        split = geolife_split(user, start.astype(float))
        with conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE _split (traj_id int, split text) ON COMMIT DROP")
            with cur.copy("COPY _split FROM STDIN") as copy:
                for row in zip(ids.tolist(), split.tolist()):
                    copy.write_row(row)
            cur.execute(sql.SQL("UPDATE {}.trajectories t SET split = x.split FROM _split x WHERE x.traj_id = t.traj_id")
                        .format(s))
        report.trajectories, report.users = len(ids), len(np.unique(user))
        report.seconds["trajectories"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        log(f"building {schema}.trips (MobilityDB tgeompoint)")
        conn.execute(sql.SQL("""
            CREATE TABLE {s}.trips AS
            SELECT traj_id, min(user_id)::smallint AS user_id,
                   tgeompointSeq(array_agg(tgeompoint(geom, ts) ORDER BY ts)) AS trip
              FROM (SELECT DISTINCT ON (traj_id, ts_epoch) traj_id, user_id, ts, geom
                      FROM {s}.points ORDER BY traj_id, ts_epoch) p
             GROUP BY traj_id""").format(s=s))
        conn.execute(sql.SQL("ALTER TABLE {s}.trips ADD PRIMARY KEY (traj_id)").format(s=s))
        report.trips = conn.execute(sql.SQL("SELECT count(*) FROM {}.trips").format(s)).fetchone()[0]
        report.seconds["trips"] = time.perf_counter() - t0
        conn.execute(sql.SQL("CREATE INDEX ON {}.points (traj_id, ts_epoch)").format(s))
    for table in ("points", "trajectories", "trips", "labels"):
        conn.execute(sql.SQL("ANALYZE {}.{}").format(s, sql.Identifier(table)))
    return report


class GeoLifeZip:
    """The GeoLife 1.3 distribution as Microsoft publishes it (``Geolife Trajectories 1.3.zip``), read in place:
    ``Data/<user>/Trajectory/<start>.plt`` (six header lines, then ``lat,lon,0,altitude ft,days,date,time``
    in GMT) and ``Data/<user>/labels.txt``. Trajectory ids as in points.parquet: user * 100000 + the file's
    index among the user's files in name order."""

    _PLT = re.compile(r"(?:^|/)Data/(\d{3})/Trajectory/([^/]+\.plt)$")
    _LABELS = re.compile(r"(?:^|/)Data/(\d{3})/labels\.txt$")

    def __init__(self, path: Path, users=None):
        import zipfile

        try:
            self.zip = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise SourceError(f"cannot open the GeoLife zip {path}: {exc}") from None
        self.files: dict[int, list[str]] = {}
        self.label_files: dict[int, str] = {}
        for name in self.zip.namelist():
            if m := self._PLT.search(name):
                self.files.setdefault(int(m.group(1)), []).append(name)
            elif m := self._LABELS.search(name):
                self.label_files[int(m.group(1))] = name
        if not self.files:
            raise SourceError(f"{path} has no Data/<user>/Trajectory/*.plt files",
                              hint="expected the GeoLife 1.3 distribution's zip")
        self.users = sorted(u for u in self.files if users is None or u in users)

    def point_batches(self):
        """One Arrow table per user: user_id, traj_id, ts, lat, lon, alt_ft (what points.parquet holds)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.csv as pacsv

        names = ["lat", "lon", "zero", "alt_ft", "days", "date", "time"]
        for user in self.users:
            parts = []
            for k, name in enumerate(sorted(self.files[user], key=lambda n: n.rsplit("/", 1)[-1])):
                t = pacsv.read_csv(io.BytesIO(self.zip.read(name)),
                                   read_options=pacsv.ReadOptions(skip_rows=6, column_names=names),
                                   convert_options=pacsv.ConvertOptions(column_types={
                                       "lat": pa.float64(), "lon": pa.float64(), "alt_ft": pa.float32(),
                                       "date": pa.string(), "time": pa.string()}))
                stamp = pc.strptime(pc.binary_join_element_wise(t["date"], t["time"], " "), "%Y-%m-%d %H:%M:%S", "s")
                n = t.num_rows
                parts.append(pa.table({"user_id": pa.array(np.full(n, user, np.int16)),
                                       "traj_id": pa.array(np.full(n, user * 100000 + k, np.int32)),
                                       "ts": pc.cast(pc.cast(stamp, pa.timestamp("s")), pa.int64()),
                                       "lat": t["lat"], "lon": t["lon"], "alt_ft": t["alt_ft"]}))
            if parts:
                yield pa.concat_tables(parts)

    @property
    def labels(self) -> list[dict]:
        from datetime import datetime, timezone

        def epoch(text: str) -> int:
            return int(datetime.strptime(text.strip(), "%Y/%m/%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp())

        out = []
        for user in self.users:
            if user in self.label_files:
                for line in self.zip.read(self.label_files[user]).decode().splitlines()[1:]:
                    if line.strip():
                        start, end, mode = line.split("\t")
                        out.append({"user_id": user, "start_ts": epoch(start), "end_ts": epoch(end),
                                    "mode": mode.strip()})
        return out


@dataclass
class GeoLifeFiles:
    """GeoLife read straight from its parquet files (no database): what the benchmarks and the base model's
    recipe use to reach all 140 users quickly. One Trajectory per original file, in ``traj_id`` order."""

    trajectories: list
    user: np.ndarray
    split: np.ndarray          # core.splits.geolife_split
    labels: list               # (user_id, start_ts, end_ts, mode) rows


def read_geolife_files(data_dir: str | Path, users=None) -> GeoLifeFiles:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pgtraj.core.trajectory import Trajectory

    data_dir = Path(data_dir)
    if not (data_dir / "points.parquet").exists():
        raise SourceError(f"GeoLife file {data_dir / 'points.parquet'} not found",
                          hint="set PGTRAJ_DATA to the folder with geolife/points.parquet")
    table = pq.read_table(data_dir / "points.parquet", columns=["user_id", "traj_id", "ts", "lat", "lon"])
    if users is not None:
        table = table.filter(pc.is_in(table["user_id"], value_set=pa.array(list(users), pa.int16())))
    cols = {c: table[c].to_numpy() for c in ("user_id", "traj_id", "ts", "lat", "lon")}
    order = np.lexsort((cols["ts"], cols["traj_id"]))  # stable: a file's fixes in time order
    cols = {c: v[order] for c, v in cols.items()}
    ids, first = np.unique(cols["traj_id"], return_index=True)
    bounds = np.append(first, len(order))
    trajs = [Trajectory(int(i), cols["ts"][a:b].astype(np.float64), cols["lat"][a:b], cols["lon"][a:b])
             for i, a, b in zip(ids.tolist(), bounds[:-1], bounds[1:])]
    user = cols["user_id"][first].astype(np.int64)
    start = cols["ts"][first].astype(np.float64)
    labels = pq.read_table(data_dir / "labels.parquet").to_pylist() if (data_dir / "labels.parquet").exists() else []
    return GeoLifeFiles(trajs, user, geolife_split(user, start), labels)


def _ts(epoch: int):
    from datetime import datetime, timezone

    return datetime.fromtimestamp(epoch, timezone.utc)
