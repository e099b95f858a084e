"""The README's main job, end to end on the local database: install, load real data, read and clean it,
learn the tokenizer, and tokenize inside PostgreSQL. Later stages (train, embed, search, predict) extend it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .clean import CleaningConfig, CleaningReport, clean
from .connection import connect
from .datasets import load_geolife
from .install import install
from .io import QuerySource, TrajectoryReader
from .localdb import LocalCluster
from .tokenizer import Tokenizer, TokenizerConfig


def run(cluster: LocalCluster, *, data_dir: Path, users: list[int] | None, out_dir: Path, log=print) -> dict:
    url = cluster.start(log=log)
    install(url, python_path=cluster.python_path, log=log)
    summary: dict = {}
    with connect(url) as conn:
        version, info = conn.execute("SELECT pgtraj.version(), pgtraj.runtime_info()").fetchone()
        log(f"SELECT pgtraj.version() -> {version}; PL/Python runs numpy {info['numpy']}, "
            f"onnxruntime {info['onnxruntime']}, h3 {info['h3']}")

        load = load_geolife(conn, data_dir, users=users, replace=True, log=log)
        log(f"loaded GeoLife: {load.points} fixes, {load.trajectories} trajectories of {load.users} users")

        config = TokenizerConfig(resolution=9, min_count=5, timezone="Asia/Shanghai")
        pieces = {}
        for split in ("train", "test"):
            reader = TrajectoryReader(conn, QuerySource(
                "SELECT traj_id, geom FROM geolife.trajectories WHERE split = %s ORDER BY traj_id", (split,)),
                progress=True)
            report = CleaningReport()
            pieces[split] = [p for tr in reader for p in clean(tr, CleaningConfig(), report)]
            log(f"{split}: read {reader.report.summary()}")
            log(f"{split}: cleaned {report.summary()}")
            summary[f"{split}_cleaning"] = dict(report.counts)

        tok = Tokenizer.fit(pieces["train"], config)
        test_tokens = np.concatenate([tok.encode(p).tokens for p in pieces["test"]])
        shares = tok.resolution_shares(test_tokens)
        log(f"tokenizer: H3 res {config.resolution}, {tok.vocab_size} tokens "
            f"({len(tok.vocab)} cells at resolutions {sorted(tok.coverage['by_resolution'], key=int)})")
        log(f"test split coverage: {json.dumps(shares)} (fallback to coarser cells instead of UNK)")
        summary.update(vocab_size=tok.vocab_size, test_token_resolution_shares=shares,
                       training_coverage=tok.coverage)

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "tokenizer.json").write_text(tok.to_json())
        n, cells, unk = conn.execute(
            """SELECT count(*), count(DISTINCT t.cell), count(*) FILTER (WHERE t.token = 2)
                 FROM (SELECT geom FROM geolife.trajectories WHERE split = 'test' ORDER BY traj_id LIMIT 1) g,
                      pgtraj.tokenize(g.geom, %s::jsonb) t""", [tok.to_json()]).fetchone()
        log(f"in SQL: pgtraj.tokenize(<first test trajectory>, tokenizer) -> {n} tokens over {cells} cells, {unk} UNK")
    (out_dir / "quickstart.json").write_text(json.dumps(summary, indent=2, default=str))
    log(f"wrote {out_dir / 'tokenizer.json'} and {out_dir / 'quickstart.json'}")
    log(f"connect with: psql '{url}'")
    return summary
