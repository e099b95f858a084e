"""What fine-tuning starts from: a training run's checkpoint.pt or a registered model's weights (the
shipped base model included), and how its weights move into a model with another vocabulary.

The core of a model (moves, time, motion: the transformer and its heads) carries over unchanged. Its cell
vocabulary is local knowledge: fine-tuning either keeps the pretrained vocabulary ("inherit": the same
places, e.g. a base model of the same city) or fits one on its own data ("own": another place), and then
every cell both vocabularies know keeps its pretrained embedding (and so do its ancestors'); a cell only the
new data knows starts as the pretrained model's UNK, what the model learnt for "a place I do not know"
(learn.batches: hide_cells), so that before any step it predicts as the pretrained model would there.

``init_from: 'auto'`` (the default of every training path) starts from the registered base model when it
suits the run (auto_start), and from nothing otherwise; either way the log says which and why.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from pgtraj.core.contract import BASE_MODEL
from pgtraj.core.errors import ConfigError
from pgtraj.core.tokenizer import AUTO_ZONE, SPECIAL_TOKENS, UNK, Tokenizer
from pgtraj.learn.export import weights_state
from pgtraj.learn.model import ModelConfig, TrajectoryModel

AUTO = "auto"   # init_from: the base model where it suits, else from scratch

VOCABULARIES = ("auto", "inherit", "own")
# "auto" inherits the pretrained vocabulary when it knows at least this share of the new training data's
# cells at full resolution, and fits its own otherwise
AUTO_INHERIT_COVERAGE = 0.5
# ModelConfig fields a vocabulary decides; the others are the core's shape
VOCAB_FIELDS = ("vocab_size", "ancestor_vocab_size", "ancestor_levels", "n_classes")


@dataclass
class Pretrained:
    state: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    model_config: dict
    source: str            # what it is, for messages: a path, or 'name v3'
    objective: str | None = None
    steps: int | None = None

    @classmethod
    def checkpoint(cls, path) -> "Pretrained":
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        return cls(ckpt["model"], Tokenizer.from_json(ckpt["tokenizer"]), ckpt["model_config"], str(path),
                   ckpt["train_config"]["objective"], ckpt["step"])

    @classmethod
    def registered(cls, label: str, weights: bytes, tokenizer, config: dict, objective: str | None) -> "Pretrained":
        """From a registry row: its 'weights' artifact (weights_npz), tokenizer and config."""
        state = weights_state(weights)
        steps = (config.get("pretraining") or {}).get("steps") or (config.get("train") or {}).get("steps")
        return cls(state, tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_json(tokenizer),
                   config["model"], label, objective, steps)

    def inherited(self, timezone: str) -> Tokenizer:
        if timezone == self.tokenizer.config.timezone:
            return self.tokenizer
        return Tokenizer(replace(self.tokenizer.config, timezone=timezone), self.tokenizer.vocab,
                         self.tokenizer.coverage)

    def core_sizes(self) -> dict:
        """The ModelConfig fields of the core: a model fine-tuned from this one has the same."""
        return {k: v for k, v in self.model_config.items() if k not in VOCAB_FIELDS}

    def vocabulary(self, choice: str, train_set: list, fit, timezone: str = AUTO_ZONE) -> tuple[Tokenizer, str]:
        """The tokenizer of the fine-tuned model and why: ``fit()`` makes one from the training data. An
        inherited vocabulary reads time as this run asks (``timezone``): time features mean local time in
        every model, so where the pretraining data lived does not decide the clock of the new data."""
        if choice not in VOCABULARIES:
            raise ConfigError(f"vocabulary must be one of {VOCABULARIES}, not {choice!r}")
        if choice == "inherit":
            return self.inherited(timezone), "the pretrained vocabulary, as asked"
        own = fit()
        if choice == "own":
            return own, "its own vocabulary, as asked"
        known = known_share(self.tokenizer, own)
        if known >= AUTO_INHERIT_COVERAGE:
            return self.inherited(timezone), f"the pretrained vocabulary (it knows {known:.0%} of this data's cells)"
        return own, f"its own vocabulary (the pretrained one knows {known:.0%} of this data's cells)"


def auto_start(base: Pretrained | None, cfg) -> tuple[Pretrained | None, str]:
    """What ``init_from: 'auto'`` starts a run of TrainConfig ``cfg`` from, and why: the registered base
    model ``base`` (None: not registered), unless the run asks for another resolution or model shape."""
    scratch = "from scratch (init_from 'auto'"
    if base is None:
        return None, f"{scratch}: {BASE_MODEL} is not registered here; `pgtraj models add base` adds it)"
    res = cfg.tokenizer.get("resolution", "auto")
    if res != "auto" and res != base.tokenizer.config.resolution:
        return None, f"{scratch}: resolution {res}, {base.source} has {base.tokenizer.config.resolution})"
    sizes = {**(ModelConfig.preset(cfg.preset) if cfg.preset else {}), **cfg.model}
    differ = sorted(k for k, v in base.core_sizes().items() if k in sizes and sizes[k] != v and k != "dropout")
    if differ:
        return None, f"{scratch}: this config's {', '.join(differ)} differ from {base.source}'s)"
    return base, f"from {base.source} (init_from 'auto'; null trains from scratch)"


def known_share(pretrained: Tokenizer, own: Tokenizer) -> float:
    """Share of the training visits (as ``own`` counted them when fitted) in cells that ``pretrained``
    knows at full resolution."""
    res = pretrained.config.resolution
    fine = own.vocab[((own.vocab >> np.uint64(52)) & np.uint64(0xF)) == res]
    visits = own.coverage.get("by_resolution", {}).get(str(res), {}).get("visits") or 0
    total = own.coverage.get("training_visits") or 0
    if not total or not len(fine):
        return 0.0
    return float(np.isin(fine, pretrained.vocab).mean()) * visits / total


def load_into(model: TrajectoryModel, tok: Tokenizer, init: Pretrained) -> None:
    """Copy ``init``'s weights into ``model`` (of tokenizer ``tok``): the core as it is; cell and ancestor
    embeddings by cell; a head the pretrained model lacks (or sized for other classes) starts fresh."""
    own = model.state_dict()
    state = {k: v for k, v in init.state.items() if k in own and own[k].shape == v.shape}
    cont = init.state.get("backbone.cont.weight")
    if cont is not None and own["backbone.cont.weight"].shape[1] > cont.shape[1]:
        # a model that reads more continuous columns (altitude) than the pretrained one: the shared columns
        # keep their weights, the new ones start at zero, so it first predicts as the pretrained model did
        wider = torch.zeros(own["backbone.cont.weight"].shape, dtype=cont.dtype)
        wider[:, : cont.shape[1]] = cont
        state["backbone.cont.weight"] = wider
    if not np.array_equal(tok.vocab, init.tokenizer.vocab):
        emb = init.state["backbone.tok.weight"]
        new = emb[UNK].repeat(tok.vocab_size, 1)
        new[: len(SPECIAL_TOKENS)] = emb[: len(SPECIAL_TOKENS)]
        src, dst = _matches(init.tokenizer.vocab, tok.vocab)
        new[dst + len(SPECIAL_TOKENS)] = emb[src + len(SPECIAL_TOKENS)]
        state["backbone.tok.weight"] = new
        anc = init.state["backbone.anc.weight"]
        new_anc = torch.zeros(own["backbone.anc.weight"].shape, dtype=anc.dtype)
        src, dst = _matches(init.tokenizer.ancestor_cells(), tok.ancestor_cells())
        new_anc[dst + 1] = anc[src + 1]   # row 0: no ancestor
        state["backbone.anc.weight"] = new_anc
        state.pop("backbone.ancestors", None)   # the new tokenizer's own table (model built for it)
        state.pop("lm_head.weight", None)       # tied to the token embedding
    model.load_state_dict(state, strict=False)


def _matches(old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (in old, in new) of the cells both sorted arrays hold."""
    _, i_old, i_new = np.intersect1d(old, new, assume_unique=True, return_indices=True)
    return torch.from_numpy(i_old.astype(np.int64)), torch.from_numpy(i_new.astype(np.int64))

