"""From the rows of a training source to the cleaned, split trips a model trains on: the one path of both
`pgtraj train` (rows read with psycopg) and CALL pgtraj.train (rows read with SPI), so that a table trains
the same model from either side.

A row is ``(entity, id, wkb, reason, split, label)``, as runtime/sources.py reads any table or query: the WKB
of one LINESTRING M (a point table's fixes of one id make one line, cut into trips here at cleaning's pause
threshold), or NULL and the reason PostGIS or MobilityDB gave. ``split`` is the source's own train/val/test
when it has a split column; otherwise the splits are made here (``timeline_split`` within each entity, or
whole entities held out) and recorded with the run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from pgtraj.core.clean import CleaningOptions, CleaningReport, check_discard, clean
from pgtraj.core.errors import ConfigError, SourceError, TrajectoryError
from pgtraj.core.splits import FRACTIONS, entity_split, timeline_split
from pgtraj.core.trajectory import Trajectory, from_wkb

SPLIT_BY = ("time", "entity")
# held-out entity ids listed in a run's record (beyond it, the count and the rule that reproduces them)
LISTED_ENTITIES = 100


@dataclass
class Prepared:
    splits: dict[str, list[Trajectory]]   # train, val, test
    labels: dict                          # trajectory id -> label, for rows that have one
    record: dict                          # what was read, cleaned and split, and how: stored with the run


def check_split_by(split_by: str) -> str:
    if split_by not in SPLIT_BY:
        raise ConfigError(f"split_by must be one of {SPLIT_BY}, not {split_by!r}",
                          hint="time: each entity's latest fixes are val/test; entity: whole entities are")
    return split_by


@dataclass
class Read:
    """The usable trajectories of a source's rows, and what was refused."""

    trajectories: list        # (Trajectory, entity, split) per usable row
    labels: dict              # trajectory id -> label, for rows that have one
    rejected: Counter         # reason -> rows
    rows: int

    def summary(self) -> str:
        out = (f"{self.rows} rows read, {len(self.trajectories)} trajectories"
               f" ({sum(len(t) for t, _, _ in self.trajectories):,} fixes)")
        if self.rejected:
            out += "; rejected: " + ", ".join(f"{n} {reason}" for reason, n in self.rejected.most_common())
        return out


@dataclass
class Cleaned:
    """Cleaned pieces with the entity and source split of the trajectory each came from."""

    pieces: list
    entities: list
    given: list
    why: str                  # the thresholds and where they came from
    report: CleaningReport


def read_rows(rows) -> Read:
    """Parse rows ``(entity, id, wkb, reason, split, label)``; a row without a usable trajectory is counted
    by its reason, never dropped silently."""
    raw, rejected, labels = [], Counter(), {}
    n_rows = 0
    for entity, traj_id, wkb, reason, split, label in rows:
        n_rows += 1
        if label is not None:
            labels[traj_id] = label
        if wkb is None:
            rejected[reason or "NULL trajectory"] += 1
            continue
        try:
            raw.append((from_wkb(traj_id, wkb), entity, split))
        except TrajectoryError as exc:
            rejected[exc.reason] += 1
    return Read(raw, labels, rejected, n_rows)


def clean_read(read: Read, options: CleaningOptions) -> Cleaned:
    """Every trajectory cleaned with the thresholds ``options`` resolve to on them (check_discard is the
    caller's, once it has said what cleaning did)."""
    config, why = options.resolve([t for t, _, _ in read.trajectories])
    report = CleaningReport()
    pieces, entities, given = [], [], []
    for traj, entity, split in read.trajectories:
        for piece in clean(traj, config, report):
            pieces.append(piece)
            entities.append(entity)
            given.append(split)
    return Cleaned(pieces, entities, given, why, report)


def prepare(rows, options: CleaningOptions, split_by: str = "time", log=print) -> Prepared:
    check_split_by(split_by)
    read = read_rows(rows)
    log(read.summary())
    if not read.trajectories:
        raise SourceError(f"the source has no usable trajectories ({read.summary()})",
                          hint="check the table/query, its WHERE clause and the rejected rows' reasons")
    cleaned = clean_read(read, options)
    pieces, given, report = cleaned.pieces, cleaned.given, cleaned.report
    entities = ["" if e is None else e for e in cleaned.entities]
    log(f"cleaning: {cleaned.why}; {report.summary()}")
    discarded = check_discard(report, options.max_discard)

    record: dict = {"trajectories_read": read.rows, "rejected": dict(read.rejected),
                    "cleaning": {"thresholds": cleaned.why, "discarded_share": round(discarded, 6), **report.counts}}
    if any(s is not None for s in given):
        splits = {name: [p for p, s in zip(pieces, given) if s == name] for name in FRACTIONS}
        record["split"] = {"by": "column", "pieces_without_split": sum(s is None for s in given)}
    elif split_by == "entity":
        names = entity_split(np.array(entities, dtype=object))
        splits = {name: [p for p, s in zip(pieces, names) if s == name] for name in FRACTIONS}
        held = {name: sorted({str(e) for e, s in zip(entities, names) if s == name}) for name in ("val", "test")}
        record["split"] = {"by": "entity", "rule": "core.splits.entity_split (sha256 order of 'pgtraj:<entity>')",
                           **{f"{k}_entities": v[:LISTED_ENTITIES] for k, v in held.items()}}
    else:
        splits = timeline_split(pieces, entities)
        record["split"] = {"by": "time", "rule": "core.splits.timeline_split: each entity's timeline cut where"
                                                 " 70% and 80% of its fixes lie behind"}
    short = {k: sum(len(p) < options.min_points for p in v) for k, v in splits.items()}
    splits = {k: [p for p in v if len(p) >= options.min_points] for k, v in splits.items()}
    record["split"].update(
        entities=len(set(entities)), pieces_cut_too_short=sum(short.values()),
        **{name: {"pieces": len(v), "fixes": int(sum(len(p) for p in v))} for name, v in splits.items()})
    shown = "split by {by}: ".format(**record["split"]) + ", ".join(
        f"{name} {len(v)} pieces ({sum(len(p) for p in v):,} fixes)" for name, v in splits.items()) \
        + f" of {len(set(entities))} {'entity' if len(set(entities)) == 1 else 'entities'}"
    log(shown)
    for name in ("train", "val"):
        if not splits[name]:
            how = {"column": f"no row's split column says '{name}'",
                   "entity": f"{len(set(entities))} entities are too few to hold whole ones out",
                   "time": "the data is too short to cut"}[record["split"]["by"]]
            raise SourceError(f"no '{name}' trajectories to train with: {how} ({shown})",
                              hint="give the source a split column with train and val rows, or let pgtraj split it"
                                   " (no split column; split_by time or entity)")
    return Prepared(splits, read.labels, record)
