"""The one contract between the torch side (pgtraj.learn), the in-database runtime (pgtraj.runtime) and the
SQL API: what a graph of each kind takes and gives, which SQL functions serve it, how a training source's
columns are named, and what a model may be called.

A graph is exported (learn/export.py), checked when it is stored (runtime/graphs.py) and served
(runtime/tasks/) by the names and shapes written here, and nowhere else. Which graphs an objective trains is
the objective's own (learn/tasks/, Objective.graphs); the columns of the continuous features are named in
core/features.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pgtraj.core.tokenizer import N_SLOTS

# every graph's inputs, right-padded with PAD: tokens, dow, minute int64 (B, T); cont float32 (B, T, 9: the
# columns of core.features; graphs exported before pgtraj 0.4 take the first 8);
# move int64 (B, T)
INPUT_NAMES = ("tokens", "dow", "minute", "cont", "move")
# graphs exported before moves existed (pgtraj 0.1) take the first four; they are still served
LEGACY_INPUT_NAMES = INPUT_NAMES[:4]

# the columns of a training source, one spelling everywhere: CLI flags (--id-column, ...), Python keyword
# arguments (app.training) and the config keys of CALL pgtraj.train; runtime/sources.py finds those not named
SOURCE_OPTIONS = ("id_column", "traj_column", "time_column", "lat_column", "lon_column", "entity_column",
                  "split_column", "label_column")

# what the registry's CHECK constraint allows (migrations/0001_registry.sql); 'name@3' names a version
MODEL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$")
# the shipped base model's registered name (pgtraj models add base): where fine-tuning starts by default
BASE_MODEL = "pgtraj-base"


@dataclass(frozen=True)
class Output:
    name: str
    rank: int
    width: str | int | None = None  # "V": the tokenizer's vocabulary size; a number: that; None: any
    per_position: bool = False  # axes (batch, length), else (batch[, width])


@dataclass(frozen=True)
class Graph:
    kind: str
    outputs: tuple[Output, ...]
    served_by: tuple[str, ...]  # the SQL functions that run it


GRAPHS = {g.kind: g for g in (
    Graph("encoder", (Output("embedding", 2),), ("pgtraj.embed", "pgtraj.similarity")),
    # the next move (slots of the last cell's move frame, then a jump): names any cell on Earth
    Graph("next_move", (Output("probs", 2, N_SLOTS + 1), Output("log1p_dt", 1)),
          ("pgtraj.predict_next", "pgtraj.predict_path")),
    # the next vocabulary token: what models of pgtraj 0.1 were registered with, still served
    Graph("next_cell", (Output("probs", 2, "V"), Output("log1p_dt", 1)), ("pgtraj.predict_next", "pgtraj.predict_path")),
    Graph("token_nll", (Output("nll", 2, per_position=True),), ("pgtraj.score",)),
    Graph("destination", (Output("probs", 2, "V"),), ("pgtraj.predict_destination",)),
    Graph("travel_time", (Output("log1p_seconds", 1),), ("pgtraj.predict_travel_time",)),
    Graph("classify", (Output("probs", 2),), ("pgtraj.classify",)),
    # every position's log-probabilities over the vocabulary, read where cells are hidden: fill_gaps decodes
    # a contiguous path from them (core.gaps)
    Graph("masked_logp", (Output("logp", 3, "V", per_position=True),), ("pgtraj.fill_gaps", "pgtraj.fill_gaps_detail")),
    # every position's likeliest cell: what models before masked_logp (pgtraj 0.2.0) were registered with
    Graph("masked", (Output("token", 2, per_position=True), Output("probability", 2, per_position=True)),
          ("pgtraj.fill_gaps", "pgtraj.fill_gaps_detail")),
)}
