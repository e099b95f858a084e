"""ONNX embedding throughput (trajectories/s) at batch 1 and 256, onnxruntime on CPU, no torch in the loop.

    .venv/bin/python benchmarks/onnx_throughput.py [--dsn URL] [--preset small] [--threads 1]

Uses the GeoLife test split (from `pgtraj load`), tokenized and cut to --max-len tokens, and an encoder of the
given preset exported to ONNX (weights do not change the cost); batches are formed from length-sorted
pieces. Writes results/onnx_throughput.json (or results/onnx_throughput_threadsN.json with --threads N > 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from pgtraj.app.training import read_split
from pgtraj.core.contract import INPUT_NAMES
from pgtraj.core.features import collate, to_inputs
from pgtraj.core.tokenizer import Tokenizer, TokenizerConfig
from pgtraj.db.connection import connect, resolve_dsn
from pgtraj.learn.batches import to_tensors
from pgtraj.learn.export import export
from pgtraj.learn.model import ModelConfig, TrajectoryModel, count_parameters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=5.0, help="time budget per measurement")
    ap.add_argument("--unsorted", action="store_true", help="batch pieces in split order (to see the padding cost)")
    args = ap.parse_args()
    with connect(resolve_dsn(args.dsn)) as conn:
        train = read_split(conn, "geolife.trajectories", "train", id_column="traj_id", traj_column="geom",
                           split_column="split", log=lambda m: None)
        test = read_split(conn, "geolife.trajectories", "test", id_column="traj_id", traj_column="geom",
                          split_column="split", log=lambda m: None)
    tok = Tokenizer.fit(train, TokenizerConfig(resolution=9, min_count=5))
    # sorted by length: a batch pads to its longest member, so mixing 5- and 128-token pieces wastes compute
    inputs = [to_inputs(tok.encode(t)) for t in test]
    if not args.unsorted:
        inputs.sort(key=lambda i: len(i.tokens))
    torch.manual_seed(0)
    model = TrajectoryModel.for_tokenizer(tok, ModelConfig.preset(args.preset)).eval()
    onnx_bytes = export(model, "encoder", to_tensors(collate(inputs[:2], max_len=args.max_len)))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    results = {}
    for bs in (1, 256):
        batches = [collate(inputs[i:i + bs], max_len=args.max_len) for i in range(0, len(inputs), bs)]
        feeds = [{n: getattr(b, n) for n in INPUT_NAMES} for b in batches]
        sess.run(None, feeds[0])  # warm-up
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            for f in feeds:
                sess.run(None, f)
                done += len(f["tokens"])
                if time.perf_counter() - t0 >= args.seconds:
                    break
        elapsed = time.perf_counter() - t0
        results[f"batch_{bs}"] = {"trajectories_per_second": round(done / elapsed, 1), "trajectories": done,
                                  "seconds": round(elapsed, 2)}
    summary = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "onnxruntime": ort.__version__,
               "intra_op_threads": args.threads, "preset": args.preset, "parameters": count_parameters(model),
               "max_len": args.max_len, "test_pieces": len(inputs), "length_sorted_batches": not args.unsorted,
               "mean_tokens": round(float(np.mean([min(len(i.tokens), args.max_len) for i in inputs])), 1),
               "results": results}
    name = "onnx_throughput" + (f"_threads{args.threads}" if args.threads > 1 else "") + \
        ("_unsorted" if args.unsorted else "") + ".json"
    out = Path(__file__).parent / "results" / name
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
