"""The README's main job, end to end on the local database: install, add the shipped base model
(pgtraj-base), load real data, read and clean it, learn a tokenizer and tokenize inside PostgreSQL;
fine-tune the base model briefly for next-move prediction on the loaded users, register and deploy it;
then, in SQL only, embed every trajectory with the base model into a pgvector column, index it with HNSW,
search similar trips, predict next cells and score trips by surprise. Writes a summary JSON and a map
(PNG) of one prediction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from pgtraj.core.clean import CleaningConfig, CleaningReport, clean
from pgtraj.core.tokenizer import Tokenizer, TokenizerConfig
from pgtraj.db.cluster import LocalCluster
from pgtraj.db.connection import connect
from pgtraj.db.datasets import load_geolife
from pgtraj.db.install import install
from pgtraj.db.readers import QuerySource, TrajectoryReader


def run(cluster: LocalCluster, *, data_dir: Path, users: list[int] | None, out_dir: Path, steps: int = 200,
        log=print) -> dict:
    from pgtraj.app import base_model

    url = cluster.start(log=log)
    install(url, python_path=cluster.python_path, log=log)
    summary: dict = {}
    with connect(url) as conn:
        base = base_model.add(conn, log=log)
        summary["base_model"] = {"name": base.name, "version": base.version}
        version, info = conn.execute("SELECT pgtraj.version(), pgtraj.runtime_info()").fetchone()
        log(f"SELECT pgtraj.version() -> {version}; PL/Python runs numpy {info['numpy']}, "
            f"onnxruntime {info['onnxruntime']}, h3 {info['h3']}")

        load = load_geolife(conn, data_dir, users=users, replace=True, log=log)
        log(f"loaded GeoLife: {load.points} fixes, {load.trajectories} trajectories of {load.users} users")

        config = TokenizerConfig(resolution=9, min_count=5)
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
    summary.update(models(url, out_dir, steps, log))
    with connect(url, autocommit=True) as conn:
        summary.update(in_sql(conn, out_dir, log))
    (out_dir / "quickstart.json").write_text(json.dumps(summary, indent=2, default=str))
    log(f"wrote {out_dir / 'tokenizer.json'}, {out_dir / 'quickstart.json'} and {out_dir / 'prediction.png'}")
    log(f"connect with: psql '{url}'")
    return summary


def models(url: str, out_dir: Path, steps: int, log) -> dict:
    """geolife-next: pgtraj-base fine-tuned for the next move on the loaded users (its vocabulary too, when
    it knows most of their cells), deployed."""
    from pgtraj.app.training import train_and_register
    from pgtraj.learn.train import TrainConfig

    config = {"objective": "next_cell", "init_from": "pgtraj-base", "steps": steps, "max_len": 128,
              "batch_size": 32, "lr": 5e-4, "warmup": 20, "eval_every": max(1, min(100, steps)), "eval_batches": 4,
              "tokenizer": {"resolution": 9, "min_count": 5}, "cleaning": {"profile": "person"}}
    runs = out_dir / "runs"
    shutil.rmtree(runs, ignore_errors=True)  # the main job starts from nothing each time
    nxt = train_and_register(url, "geolife-next", "geolife.trajectories", TrainConfig.from_dict(config),
                             runs / "next", deploy=True, log=log)
    return {"models": {nxt.name: {"version": nxt.version, "val_loss": nxt.metrics["val_loss"],
                                  "fine_tuned_from": "pgtraj-base", "steps": steps}}}


def in_sql(conn, out_dir: Path, log) -> dict:
    """What a user does next, in SQL only."""
    out: dict = {}
    conn.execute("ALTER TABLE geolife.trajectories ADD COLUMN IF NOT EXISTS embedding vector")
    conn.execute("CALL pgtraj.embed_table('geolife.trajectories', 'geom', 'embedding', 'pgtraj-base')")
    dim = conn.execute("SELECT vector_dims(embedding) FROM geolife.trajectories WHERE embedding IS NOT NULL"
                       " LIMIT 1").fetchone()[0]
    conn.execute(f"ALTER TABLE geolife.trajectories ALTER COLUMN embedding TYPE vector({int(dim)})")
    conn.execute("CREATE INDEX IF NOT EXISTS trajectories_embedding_hnsw ON geolife.trajectories"
                 " USING hnsw (embedding vector_cosine_ops)")
    embedded, = conn.execute("SELECT count(embedding) FROM geolife.trajectories").fetchone()
    log(f"in SQL: CALL pgtraj.embed_table(..., 'pgtraj-base') -> {embedded} embeddings (vector({dim})), HNSW index built")
    query_id, = conn.execute("SELECT traj_id FROM geolife.trajectories WHERE split = 'test' AND embedding IS NOT NULL"
                             " ORDER BY n_points DESC LIMIT 1").fetchone()
    similar = conn.execute("""
        SELECT t.traj_id, round((t.embedding <=> q.embedding)::numeric, 4) AS distance
          FROM geolife.trajectories t, geolife.trajectories q
         WHERE q.traj_id = %s AND t.traj_id <> q.traj_id
         ORDER BY t.embedding <=> q.embedding LIMIT 5""", [query_id]).fetchall()
    log(f"in SQL: 5 trips most similar to {query_id} (HNSW, cosine): {similar}")
    rows = conn.execute("""
        SELECT p.rank, p.cell::text, round(p.probability::numeric, 4), round(p.expected_seconds::numeric, 1),
               ST_Y(p.geom), ST_X(p.geom)
          FROM geolife.trajectories g, pgtraj.predict_next(g.geom, 'geolife-next', k => 5) p
         WHERE g.traj_id = %s ORDER BY p.rank""", [query_id]).fetchall()
    log(f"in SQL: pgtraj.predict_next(<trip {query_id}>, 'geolife-next', k => 5) -> "
        + ", ".join(f"#{r[0]} {r[1]} p={r[2]}" for r in rows))
    surprise = conn.execute("""
        SELECT traj_id, round(pgtraj.score(geom, 'geolife-next')::numeric, 3) AS surprise
          FROM geolife.trajectories
         WHERE split = 'test' AND ST_DistanceSphere(ST_StartPoint(geom), ST_EndPoint(geom)) > 1000
         ORDER BY 2 DESC LIMIT 3""").fetchall()
    log(f"in SQL: the 3 most surprising test trips (pgtraj.score, nats per move): {surprise}")
    out.update(embedded=embedded, similar_to={str(query_id): similar}, prediction=[r[:4] for r in rows],
               most_surprising=surprise)
    _map(conn, query_id, rows, out_dir / "prediction.png")
    return out


def _map(conn, traj_id: int, rows: list, png: Path) -> None:
    """The last stretch of a trip (up to ~1.5 km back from where it is now), the cell it is in and its
    predicted next cells (coloured by probability), on axes in plain degrees."""
    import h3
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pgtraj.core.trajectory import haversine_m

    pts = np.array(conn.execute("SELECT ST_Y(d.geom), ST_X(d.geom) FROM geolife.trajectories g,"
                                " ST_DumpPoints(g.geom) d WHERE g.traj_id = %s ORDER BY d.path", [traj_id]).fetchall())
    back = haversine_m(pts[:, 0], pts[:, 1], np.full(len(pts), pts[-1, 0]), np.full(len(pts), pts[-1, 1]))
    far = np.flatnonzero(back > 1500.0)
    lat, lon = pts[(far[-1] if len(far) else 0):].T
    fig, ax = plt.subplots(figsize=(7, 7))

    def ring(cell) -> np.ndarray:  # the cell's boundary, closed, as (lat, lon) rows
        b = h3.cell_to_boundary(cell)
        return np.array(b + b[:1])

    here = ring(h3.latlng_to_cell(float(lat[-1]), float(lon[-1]), 9))
    ax.plot(here[:, 1], here[:, 0], color="k", lw=1.5, ls="--", label="the cell it is in now")
    for rank, cell, p, _, _, _ in rows:
        r = ring(cell)
        ax.fill(r[:, 1], r[:, 0], color=plt.cm.viridis(float(p)), alpha=0.6)
        ax.plot(r[:, 1], r[:, 0], color="k", lw=0.5)
        c = h3.cell_to_latlng(cell)
        ax.annotate(f"#{rank}: p={float(p):.2f}", (c[1], c[0]), fontsize=8, ha="center")
    ax.plot(lon, lat, "-", color="tab:red", lw=1.2, label=f"trip {traj_id}, its last {len(lat)} fixes")
    ax.plot(lon[-1:], lat[-1:], "o", color="tab:red", label="its last fix")
    ax.set_title("pgtraj.predict_next: the 5 likeliest next H3 cells (resolution 9)")
    ax.set_xlabel("longitude (degrees)")
    ax.set_ylabel("latitude (degrees)")
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.xaxis.set_major_locator(plt.MaxNLocator(4))
    ax.legend(loc="best", fontsize=8)
    ax.set_aspect(1 / np.cos(np.radians(np.mean(lat))))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
