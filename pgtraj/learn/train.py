"""Training: one loop for every objective. Deterministic for a seed, resumable from its checkpoint, CPU by
default and CUDA + bf16 when present; metrics per step in metrics.jsonl and a training-curve PNG.

Data-parallel on several processes when started by torchrun (``torchrun --nproc_per_node=N -m pgtraj train
...``): DistributedDataParallel over NCCL on GPUs, gloo on CPU; each rank draws its own batches, rank 0 alone
writes checkpoints, metrics and the curve.

Checkpoints are written atomically (temporary file, then rename), so the last good one survives a crash,
a kill or a NaN loss; ``train`` resumes from it when called again with the same output directory.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pgtraj.core.errors import ConfigError, PgtrajError, config_from_dict
from pgtraj.core.clean import CleaningOptions
from pgtraj.core.features import N_CONTINUOUS, WITHOUT_ALTITUDE
from pgtraj.core.prepare import check_split_by
from pgtraj.core.tokenizer import AUTO_ZONE, Tokenizer, TokenizerConfig, choose_resolution
from pgtraj.core.trajectory import Trajectory
from pgtraj.learn.batches import Batches
from pgtraj.learn.lora import apply_lora, merge
from pgtraj.learn.model import ModelConfig, TrajectoryModel, cosine_lr, count_parameters
from pgtraj.learn.pretrained import AUTO, VOCAB_FIELDS, VOCABULARIES, Pretrained, load_into
from pgtraj.learn.tasks import OBJECTIVES, batch_for


AUTO_RESOLUTION = "auto"


class TrainingError(PgtrajError, RuntimeError):
    """Training cannot go on: no data, a NaN loss, memory exhausted at batch size 1."""


@dataclass
class TrainConfig:
    objective: str = "hybrid"
    preset: str | None = None                        # tiny | small | base | large; None: small, or init_from's
    model: dict = field(default_factory=dict)        # overrides of the preset (ModelConfig fields)
    tokenizer: dict = field(default_factory=dict)    # TokenizerConfig fields; resolution unset or 'auto':
                                                     # init_from's, else chosen from the data
    cleaning: dict = field(default_factory=dict)     # CleaningOptions fields: profile, thresholds, max_discard
    split_by: str = "time"                           # a source without split column: time | entity (prepare)
    steps: int = 1000
    batch_size: int = 32
    max_len: int = 128
    lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 0
    device: str = "auto"                             # auto | cpu | cuda
    min_trajectories: int = 8
    init_from: str | None = AUTO                     # a registered model or checkpoint.pt to fine-tune from;
                                                     # auto: the base model where it suits (learn.pretrained)
    vocabulary: str = "auto"                         # with init_from: auto | inherit | own (learn.pretrained)
    hide_cells: float = 0.0                          # share of sequences shown without their cells (batches)
    pairs: int | None = None                         # contrastive pairs per step (None: batch_size): negatives
    hard_negatives: float = 0.0                      # share of those pairs drawn from one area (batches)
    lora: dict | None = None                         # {"r": 8, "alpha": 16}: train low-rank adapters only

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        cfg = config_from_dict(cls, d, "training")
        if cfg.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {cfg.objective!r}", hint=f"one of {sorted(OBJECTIVES)}")
        # checked here, before any data is read, rather than when the tokenizer is fitted on it
        config_from_dict(TokenizerConfig, {k: v for k, v in cfg.tokenizer.items()
                                           if not (k == "resolution" and v == AUTO_RESOLUTION)}, "tokenizer")
        config_from_dict(CleaningOptions, cfg.cleaning, "cleaning")
        check_split_by(cfg.split_by)
        if cfg.preset is not None and cfg.preset not in ("tiny", "small", "base", "large"):
            raise ConfigError(f"unknown preset {cfg.preset!r}", hint="one of tiny, small, base, large")
        if cfg.vocabulary not in VOCABULARIES:
            raise ConfigError(f"vocabulary must be one of {VOCABULARIES}, not {cfg.vocabulary!r}")
        if cfg.pairs is not None and (not isinstance(cfg.pairs, int) or cfg.pairs < 2):
            raise ConfigError(f"pairs must be an integer >= 2, not {cfg.pairs!r}")
        if not 0.0 <= cfg.hide_cells < 1.0:
            raise ConfigError(f"hide_cells must be a share in [0, 1), not {cfg.hide_cells!r}")
        if not 0.0 <= cfg.hard_negatives <= 1.0:
            raise ConfigError(f"hard_negatives must be a share in [0, 1], not {cfg.hard_negatives!r}")
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class TrainResult:
    model: TrajectoryModel
    tokenizer: Tokenizer
    config: TrainConfig
    model_config: ModelConfig
    metrics: dict
    out_dir: Path
    device: str
    classes: list[str] | None = None   # class names of a classify model, in output order


def load_checkpoint(path: str | Path) -> tuple[TrajectoryModel, Tokenizer, dict]:
    """The model (eval mode, CPU) and tokenizer of a training run's checkpoint.pt, and the raw checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = TrajectoryModel(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), Tokenizer.from_json(ckpt["tokenizer"]), ckpt


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' asked for but torch sees no GPU", hint="use --device cpu or auto")
    return name


def _labelled(trajs: list[Trajectory], labels: dict, classes: list[str]) -> tuple[list[Trajectory], list[int]]:
    index = {c: i for i, c in enumerate(classes)}
    keep = [t for t in trajs if labels.get(t.id) in index]
    return keep, [index[labels[t.id]] for t in keep]


def train(train_set: list[Trajectory], val_set: list[Trajectory], cfg: TrainConfig, out_dir: str | Path, *,
          labels: dict | None = None, progress: bool = True, log=print, on_step=None,
          init: Pretrained | None = None) -> TrainResult:
    """Train (or resume training) in ``out_dir``. ``labels`` maps trajectory id -> class name for the
    classify objective (unlabelled trajectories are left out; the classes are those of the training split).
    ``on_step(step, model, record)`` is called after every optimiser step (callbacks: custom logging,
    early stop by raising). ``init``: the pretrained model ``cfg.init_from`` names, when it names a
    registered model or is 'auto' (the caller reads the registry); a checkpoint path is read here."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    needs_labels = OBJECTIVES[cfg.objective].needs_labels
    classes, train_labels, val_labels = None, None, None
    if needs_labels:
        if not labels:
            raise TrainingError(f"objective {cfg.objective!r} needs a label per trajectory",
                                hint="pass labels (trajectory id -> class), e.g. --label-column on the CLI")
        classes = sorted({str(labels[t.id]) for t in train_set if t.id in labels})
        labels = {k: str(v) for k, v in labels.items()}
        if len(classes) < 2:
            raise TrainingError(f"classification needs at least 2 classes among the training labels, found {classes}")
        train_set, train_labels = _labelled(train_set, labels, classes)
        val_set, val_labels = _labelled(val_set, labels, classes)
    if len(train_set) < cfg.min_trajectories:
        raise TrainingError(f"{len(train_set)} training trajectories after cleaning; need at least {cfg.min_trajectories}",
                            hint="widen the source query, or lower min_trajectories for a smoke test")
    if not val_set:
        raise TrainingError("no validation trajectories", hint="the source needs a 'val' split (or more data)")
    device = pick_device(cfg.device)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if world > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    ckpt_path = out_dir / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path.exists() else None
    if ckpt is not None and ckpt["train_config"] != asdict(cfg):
        raise TrainingError(f"{ckpt_path} was written with another training config",
                            hint="use a new output directory, or the same config to resume")
    torch.manual_seed(cfg.seed)
    if cfg.init_from and cfg.init_from != AUTO and not ckpt and init is None:
        if not Path(cfg.init_from).is_file():
            raise TrainingError(f"init_from {cfg.init_from!r} is not a checkpoint file",
                                hint="a registered model is read by `pgtraj train` and CALL pgtraj.train")
        init = Pretrained.checkpoint(cfg.init_from)
    init = None if ckpt else init

    def fit() -> Tokenizer:
        tok_cfg = dict(cfg.tokenizer)
        if tok_cfg.get("resolution", AUTO_RESOLUTION) == AUTO_RESOLUTION:
            if init:  # its cells, and so its cell embeddings, are at its resolution
                tok_cfg["resolution"] = init.tokenizer.config.resolution
                log(f"tokenizer resolution {tok_cfg['resolution']}: {init.source}'s")
            else:
                tok_cfg["resolution"], why = choose_resolution(train_set)
                log(f"tokenizer {why}")
        return Tokenizer.fit(train_set, config_from_dict(TokenizerConfig, tok_cfg, "tokenizer"))

    if ckpt:
        tok = Tokenizer.from_json(ckpt["tokenizer"])
    elif init:
        tok, why = init.vocabulary(cfg.vocabulary, train_set, fit, cfg.tokenizer.get("timezone", AUTO_ZONE))
        log(f"fine-tuning {init.source} with {why}: {tok.vocab_size} tokens")
    else:
        tok = fit()
    if ckpt and ckpt.get("classes") is not None:
        classes = ckpt["classes"]
    sizes = {**(ModelConfig.preset(cfg.preset or "small") if init is None or cfg.preset else {}), **cfg.model}
    if ckpt:  # resuming: the shape it was written with (a fine-tuning run's is its pretrained model's)
        sizes = {k: v for k, v in ckpt["model_config"].items() if k not in VOCAB_FIELDS}
    elif init:  # the core's shape is the pretrained one's; dropout is a training choice
        differ = {k: (sizes[k], v) for k, v in init.core_sizes().items() if k in sizes and sizes[k] != v
                  and k != "dropout"}
        if differ:
            raise TrainingError(f"{init.source} has another model shape than this config: "
                                + ", ".join(f"{k} {a} here, {b} there" for k, (a, b) in sorted(differ.items())),
                                hint="leave preset and model unset to take the pretrained model's")
        sizes = {**init.core_sizes(), **sizes}
    if not ckpt and "n_continuous" not in cfg.model:
        # altitude is a feature when most training trajectories have one (a Z coordinate)
        with_z = sum(p.z is not None for p in train_set) > len(train_set) / 2
        sizes["n_continuous"] = N_CONTINUOUS if with_z else sizes.get("n_continuous", WITHOUT_ALTITUDE)
        if with_z:
            log("altitude (Z) is a feature: most training trajectories have one")
    model = TrajectoryModel.for_tokenizer(tok, {**sizes, "n_classes": len(classes) if classes else 0})
    mcfg = model.cfg
    if init:
        load_into(model, tok, init)
        log(f"initialised from {init.source} (pretrained {init.steps} steps, {init.objective})")
    if cfg.lora is not None:  # before loading a checkpoint: a LoRA run's checkpoint holds the adapters
        trainable = apply_lora(model, **cfg.lora)
        log(f"LoRA {cfg.lora}: training {trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters")
    model = model.to(device)
    objective = OBJECTIVES[cfg.objective](model)
    if world > 1:  # same initial weights on every rank (same seed); DDP averages the gradients
        objective.use(DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None,
                                              find_unused_parameters=True))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    batch_size, step, history = cfg.batch_size, 0, []
    data = Batches(train_set, tok, batch_size=batch_size, max_len=cfg.max_len, seed=cfg.seed + rank, device=device,
                   labels=train_labels, tail=objective.tail_windows, hide_cells=cfg.hide_cells, pairs=cfg.pairs,
                   hard_negatives=cfg.hard_negatives)
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, history, batch_size = ckpt["step"], ckpt["history"], ckpt["batch_size"]
        data.resize(batch_size)
        data.restore(ckpt["data_state"][rank])
        torch.set_rng_state(ckpt["torch_rng"][rank])
        log(f"resuming from step {step} ({ckpt_path})")
        if rank == 0:
            _truncate_metrics(out_dir / "metrics.jsonl", step)  # drop steps logged after the checkpoint
    if rank != 0:
        log, progress = (lambda m: None), False
    log(f"model {count_parameters(model)} parameters, vocabulary {tok.vocab_size}, objective {cfg.objective}, "
        f"device {device}{f' x {world} processes' if world > 1 else ''}, {len(train_set)} train / "
        f"{len(val_set)} val trajectories")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    metrics_file = open(out_dir / "metrics.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.objective}", disable=not progress)
    t0, tokens_seen = time.perf_counter(), 0
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, warmup=cfg.warmup, total=cfg.steps, lr=cfg.lr)
        model.train()
        try:
            batch = batch_for(objective, data)
            with autocast:
                loss, m = objective.loss(batch)
            if not _finite_everywhere(loss, world):  # all ranks stop together, none waits forever
                raise TrainingError(f"loss became {loss.item()} at step {step}",
                                    hint=f"the last good checkpoint is {ckpt_path}; lower lr (now {cfg.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if on_step is not None:
                on_step(step + 1, model, m)
        except torch.OutOfMemoryError:
            if world > 1:  # the other ranks are already inside the gradient all-reduce
                raise TrainingError(f"out of memory at batch size {batch_size} on rank {rank}",
                                    hint="lower batch_size, max_len or the preset")
            if batch_size == 1:
                raise TrainingError("out of memory at batch size 1", hint="use a smaller preset or max_len")
            batch_size = batch_size // 2
            data.resize(batch_size)
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.empty_cache()
            log(f"out of memory: continuing with batch size {batch_size}")
            continue
        tokens_seen += _count_tokens(batch)
        step += 1
        record = {"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"], **m}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record.update(evaluate(objective, model, val_set, tok, cfg, device, val_labels))
            history.append(record)
            rngs = _gather((data.state(), torch.get_rng_state()), world)
            if rank == 0:
                _save(ckpt_path, model, opt, tok, cfg, step, history, batch_size, rngs, classes)
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    elapsed = time.perf_counter() - t0
    tokens_seen *= world
    final = {"steps": step, "val_loss": history[-1]["val_loss"] if history else None,
             **{f"val_{k}": history[-1][f"val_{k}"] for k in VOCABULARY_FREE if history and f"val_{k}" in history[-1]},
             "train_loss": history[-1]["loss"] if history else None,
             "tokens_per_second": round(tokens_seen / elapsed, 1) if elapsed > 0 else None,
             "parameters": sum(p.numel() for p in model.parameters()), "device": device,
             "batch_size_final": batch_size, "processes": world}
    if rank == 0:
        metrics_file.close()
        plot_curves(out_dir / "metrics.jsonl", out_dir / "training_curve.png", title=f"{cfg.objective} ({cfg.preset or mcfg.d_model})")
        (out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
    if world > 1:
        dist.barrier()
    # adapters folded back into plain layers: what is exported and registered is an ordinary model
    return TrainResult(merge(model).eval().cpu(), tok, cfg, mcfg, final, out_dir, device, classes)


def _finite_everywhere(loss: torch.Tensor, world: int) -> bool:
    ok = torch.tensor([1.0 if math.isfinite(loss.item()) else 0.0])
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() == 1.0)


def _gather(obj, world: int) -> list:
    """Every rank's ``obj`` (random generator states, so that a resumed run continues each rank's stream)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# validation figures that do not depend on the vocabulary: comparable between models with other tokenizers
VOCABULARY_FREE = ("move_ce",)


def evaluate(objective, model, val_set, tok, cfg: TrainConfig, device: str, labels: list[int] | None = None) -> dict:
    """Mean validation loss over a fixed set of batches (same seed every time: comparable across steps), as
    "val_loss", and the vocabulary-free parts of it (e.g. "val_move_ce") where the objective has them."""
    was = torch.get_rng_state()
    torch.manual_seed(cfg.seed + 1)
    data = Batches(val_set, tok, batch_size=min(cfg.batch_size, max(2, len(val_set))), max_len=cfg.max_len,
                   seed=cfg.seed + 1, device=device, labels=labels, tail=objective.tail_windows)
    model.eval()
    with torch.no_grad():
        runs = [objective.loss(batch_for(objective, data)) for _ in range(cfg.eval_batches)]
    torch.set_rng_state(was)
    out = {"val_loss": float(np.mean([loss.item() for loss, _ in runs]))}
    for key in VOCABULARY_FREE:
        if all(key in m for _, m in runs):
            out[f"val_{key}"] = float(np.mean([m[key] for _, m in runs]))
    return out


def _truncate_metrics(path: Path, step: int) -> None:
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def _count_tokens(batch) -> int:
    if isinstance(batch, dict):
        return int((batch["tokens"] != 0).sum())
    return sum(_count_tokens(b) for b in batch)


def _save(path: Path, model, opt, tok, cfg, step, history, batch_size, rngs: list, classes) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "tokenizer": tok.to_json(),
                "train_config": asdict(cfg), "model_config": model.cfg.to_dict(), "step": step,
                "history": history, "batch_size": batch_size, "data_state": [r[0] for r in rngs],
                "torch_rng": [r[1] for r in rngs], "classes": classes}, tmp)
    os.replace(tmp, path)


def plot_curves(metrics_jsonl: Path, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8, alpha=0.6, label="train loss")
    val = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
