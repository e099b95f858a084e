"""The base model shipped with pgtraj (``pgtraj/assets/base``): how it is built from GeoLife
(``pgtraj base build``, recipe training/base.json) and how it goes into a database's registry as
``pgtraj-base`` (``pgtraj models add base``; the main job does it first).

The release is small on purpose: the weights as float16 (what the card's metrics were measured with), the
tokenizer and the training card, with their sha256 in SHA256SUMS. The ONNX graphs are exported from the
weights when the model is added (export needs torch: the client's ``train`` extra), each checked for parity
with torch, then registered with the weights, so that fine-tuning (``init_from: 'pgtraj-base'``) starts from
them too.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from pgtraj import __version__
from pgtraj.core.contract import BASE_MODEL
from pgtraj.core.errors import PgtrajError

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "base"
FILES = ("weights.npz", "tokenizer.json", "card.json")


class BaseModelError(PgtrajError):
    """The shipped base model is missing, altered, or cannot be built."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(asset_dir: Path = ASSET_DIR) -> dict:
    """The release's card, after checking every file against SHA256SUMS."""
    sums = asset_dir / "SHA256SUMS"
    if not sums.exists():
        raise BaseModelError(f"no base model release in {asset_dir}",
                             hint="build one with `pgtraj base build` (training/base.json)")
    want = dict(reversed(line.split()) for line in sums.read_text().splitlines() if line.strip())
    for name in FILES:
        if name not in want or not (asset_dir / name).exists():
            raise BaseModelError(f"base model release {asset_dir} lacks {name}", hint="rebuild or reinstall pgtraj")
        got = _sha256(asset_dir / name)
        if got != want[name]:
            raise BaseModelError(f"base model file {asset_dir / name} has sha256 {got[:16]}…, SHA256SUMS says"
                                 f" {want[name][:16]}…", hint="the file was altered: reinstall pgtraj")
    return json.loads((asset_dir / "card.json").read_text())


def load(asset_dir: Path = ASSET_DIR):
    """(model, tokenizer, card) of the release, checked: a float32 TrajectoryModel with the shipped weights."""
    from pgtraj.core.tokenizer import Tokenizer
    from pgtraj.learn.export import weights_state
    from pgtraj.learn.model import TrajectoryModel

    card = verify(asset_dir)
    tok = Tokenizer.from_json((asset_dir / "tokenizer.json").read_text())
    model = TrajectoryModel.for_tokenizer(tok, {k: v for k, v in card["model"].items()
                                                if k not in ("vocab_size", "ancestor_vocab_size", "ancestor_levels")})
    model.load_state_dict(weights_state((asset_dir / "weights.npz").read_bytes()), strict=True)
    return model.eval(), tok, card


def add(conn, *, name: str = BASE_MODEL, asset_dir: Path = ASSET_DIR, deploy: bool = True, log=print):
    """Register the shipped base model as ``name`` (and deploy it); a no-op when the same weights are
    already registered under that name. Returns the registry.ModelVersion."""
    from pgtraj.core.synthetic import grid_trips
    from pgtraj.db import registry
    from pgtraj.learn.export import example_batch, export_checked, weights_npz

    card = verify(asset_dir)
    digest = card["weights_sha256"]
    row = conn.execute("SELECT version FROM pgtraj.model_registry WHERE name = %s AND"
                       " config -> 'release' ->> 'weights_sha256' = %s ORDER BY version DESC LIMIT 1",
                       [name, digest]).fetchone()
    if row:
        log(f"{name} v{row[0]} is already this base model ({digest[:12]})")
        return registry.load(conn, name, str(row[0]))
    t0 = time.perf_counter()
    model, tok, card = load(asset_dir)
    # parity is checked on synthetic trips: any trajectory exercises every operator of the graphs
    graphs, parity = export_checked(model, card["objective"], example_batch(tok, grid_trips(4, seed=1), 64))
    config = {"train": card["train"], "model": card["model"],
              "release": {"pgtraj": card["pgtraj"], "weights_sha256": digest, "data": card["data"]}}
    mv = registry.register(conn, name, objective=card["objective"], tokenizer=json.loads(tok.to_json()),
                           artifacts={**graphs, "weights": weights_npz(model)}, config=config,
                           metrics={**card["metrics"], "onnx_max_abs_diff": parity},
                           embedding_dim=model.cfg.d_model,
                           description=f"pgtraj base model ({card['data']['summary']}), shipped with pgtraj"
                                       f" {card['pgtraj']}")
    if deploy:
        registry.deploy(conn, name, mv.version, "the shipped base model")
    log(f"registered {name} v{mv.version} ({sum(p.numel() for p in model.parameters()):,} parameters,"
        f" graphs {', '.join(sorted(graphs))}) in {time.perf_counter() - t0:.1f} s")
    return mv


def build(data_dir: Path, config: dict, out_dir: Path, *, users=None, release_dir: Path = ASSET_DIR,
          progress: bool = True, log=print) -> dict:
    """Pretrain the base model on GeoLife (users 10-119 by default: never the held-out 120-139, nor 0-9, which
    stand for a user's own data) and write the release into ``release_dir``. Returns its card."""
    import torch

    from pgtraj.core.clean import CleaningOptions, CleaningReport, clean
    from pgtraj.core.splits import GEOLIFE_PRETRAIN_USERS
    from pgtraj.db.datasets import read_geolife_files
    from pgtraj.learn.export import weights_npz
    from pgtraj.learn.train import TrainConfig, train

    users = list(GEOLIFE_PRETRAIN_USERS if users is None else users)
    cfg = TrainConfig.from_dict(config)
    t0 = time.perf_counter()
    g = read_geolife_files(data_dir, users)
    report, pieces = CleaningReport(), {"train": [], "val": []}
    cleaning, why = CleaningOptions(**cfg.cleaning).resolve(g.trajectories)
    log(f"cleaning: {why}")
    for traj, split in zip(g.trajectories, g.split):
        if split in pieces:
            pieces[split].extend(clean(traj, cleaning, report))
    log(f"GeoLife users {users[0]}-{users[-1]}: {len(g.trajectories)} files, {report.summary()};"
        f" {len(pieces['train'])} train / {len(pieces['val'])} val pieces ({time.perf_counter() - t0:.0f} s)")
    t1 = time.perf_counter()
    result = train(pieces["train"], pieces["val"], cfg, out_dir, progress=progress, log=log)
    wall = time.perf_counter() - t1
    with torch.no_grad():  # the release stores float16: the model as shipped is the rounded one
        for p in result.model.parameters():
            p.copy_(p.half().float())
    release_dir.mkdir(parents=True, exist_ok=True)
    (release_dir / "weights.npz").write_bytes(weights_npz(result.model, half=True))
    (release_dir / "tokenizer.json").write_text(result.tokenizer.to_json())
    metrics = result.metrics
    card = {
        "name": BASE_MODEL, "pgtraj": __version__, "objective": cfg.objective,
        "train": {k: v for k, v in config.items()}, "model": result.model_config.to_dict(),
        "parameters": sum(p.numel() for p in result.model.parameters()),
        "data": {"dataset": "GeoLife 1.3 (Microsoft Research Asia)", "users": f"{users[0]}-{users[-1]}",
                 "summary": f"GeoLife users {users[0]}-{users[-1]}, {report.counts['points_out']:,} cleaned fixes",
                 "cleaning": report.summary(),
                 "files": len(g.trajectories), "train_pieces": len(pieces["train"]),
                 "val_pieces": len(pieces["val"]), "held_out_users": "120-139 (never read)"},
        "steps": metrics["steps"], "tokens_seen": round(metrics["tokens_per_second"] * wall),
        "wall_seconds": round(wall), "device": metrics["device"],
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "weights_sha256": _sha256(release_dir / "weights.npz"),
        "built": time.strftime("%Y-%m-%d"),
    }
    (release_dir / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    (release_dir / "SHA256SUMS").write_text("".join(f"{_sha256(release_dir / f)}  {f}\n" for f in FILES))
    log(f"base model release in {release_dir}: {sum((release_dir / f).stat().st_size for f in FILES) / 1e6:.1f} MB;"
        f" training curve {Path(out_dir) / 'training_curve.png'}")
    return card
