"""Run by tests/test_train.py under torchrun: a tiny training on synthetic trips; each rank writes the
sha256 of its final weights."""

import hashlib
import os
import sys

import torch

from pgtraj.core.synthetic import grid_trips
from pgtraj.learn.train import TrainConfig, train

trips = grid_trips(40, seed=4)
obj, out = sys.argv[1], sys.argv[2]
cfg = TrainConfig.from_dict(dict(objective=obj, preset="tiny", steps=6, batch_size=4, max_len=32, warmup=1, eval_every=3,
      eval_batches=1, device="cpu", tokenizer={"resolution": 9, "min_count": 2, "coarsest_resolution": 6}))
r = train(trips[:32], trips[32:], cfg, out, progress=False, log=print)
w = torch.cat([p.detach().flatten() for p in r.model.parameters()])
open(f"{out}/weights-{os.environ['RANK']}.sha", "w").write(hashlib.sha256(w.numpy().tobytes()).hexdigest())
