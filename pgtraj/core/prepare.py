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


def prepare(rows, options: CleaningOptions, split_by: str = "time", log=print) -> Prepared:
    check_split_by(split_by)
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
    read = f"{n_rows} rows read, {len(raw)} trajectories ({sum(len(t) for t, _, _ in raw):,} fixes)"
    if rejected:
        read += "; rejected: " + ", ".join(f"{n} {reason}" for reason, n in rejected.most_common())
    log(read)
    if not raw:
        raise SourceError(f"the source has no usable trajectories ({read})",
                          hint="check the table/query, its WHERE clause and the rejected rows' reasons")

    config, why = options.resolve([t for t, _, _ in raw])
    report = CleaningReport()
    pieces, entities, given = [], [], []
    for traj, entity, split in raw:
        for piece in clean(traj, config, report):
            pieces.append(piece)
            entities.append("" if entity is None else entity)
            given.append(split)
    log(f"cleaning: {why}; {report.summary()}")
    discarded = check_discard(report, options.max_discard)

    record: dict = {"trajectories_read": n_rows, "rejected": dict(rejected),
                    "cleaning": {"thresholds": why, "discarded_share": round(discarded, 6), **report.counts}}
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
    return Prepared(splits, labels, record)
