"""Interleaved A/B timing of engine variants on one method (shared, noisy cores: compare ratios).

usage: python scripts/ab_engine.py --method caw_conv --width 0.4 --rounds 5 --variants base,pipe2,standin_caw:base
(standin_caw = scripts/standin.py: the spec's CAW layer written the plain way, i.e. the authors' loop shape)
Each round times one engine epoch of --steps batches of every variant in turn, so load changes hit all alike;
reported per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cawbench.bench import random_data  # noqa: E402
from cawbench.engine import Trainer  # noqa: E402
from cawbench.method import list_methods, resolve_config  # noqa: E402

VARIANTS = {  # name -> (config overrides, channels_last on this device)
    "base": ({"train.fused_optimizer": False}, False),
    "fused": ({}, False),
    "cl": ({"train.fused_optimizer": False}, True),
    "fused_cl": ({}, True),
    "compile": ({"train.compile": True}, False),
    "compile_cl": ({"train.compile": True}, True),
    "bf16": ({"train.precision": "bf16"}, False),
    "t1": ({"train.fused_optimizer": False}, False),  # base with one intra-op thread
    "fused_t1": ({}, False),
    "pipe2": ({"train.parallel": "pipeline", "train.pipeline_threads": 2}, False),
    "compile_pipe2": (
        {"train.parallel": "pipeline", "train.pipeline_threads": 2, "train.compile": True},
        False,
    ),
    "compile_t1": ({"train.compile": True}, False),
}
THREADS = {"t1": 1, "fused_t1": 1, "compile_t1": 1}


def build(method: str, width: float, batch: int, steps: int, overrides: dict, channels_last: bool) -> Trainer:
    layer = {"method": method, "model.width": width, "train.device": "cpu", "train.progress": False,
             "train.checkpoint": False, "train.batch_size": batch, **overrides}  # fmt: skip
    cfg = resolve_config(layer)
    data = random_data((1, 32, 32), 10, batch * steps, batch, torch.device("cpu"))
    trainer = Trainer(cfg, data=data, write_result=False)
    if channels_last:
        trainer.channels_last = True
        trainer.net.to(memory_format=torch.channels_last)
    return trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="standin_caw")
    p.add_argument("--width", type=float, default=0.4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1, help="batches per timed epoch")
    p.add_argument("--variants", default="base,fused")
    args = p.parse_args()
    names = args.variants.split(",")
    trainers = {}
    for n in names:  # "variant" uses --method; "method:variant" names its own method
        method, variant = n.split(":") if ":" in n else (args.method, n)
        if method == "standin_caw" and "standin_caw" not in list_methods():
            import standin

            standin.register()
        trainers[n] = build(method, args.width, args.batch, args.steps, *VARIANTS[variant])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds + 1):
        for n, t in trainers.items():
            threads = torch.get_num_threads()
            torch.set_num_threads(THREADS.get(n.split(":")[-1], threads))
            seconds = t.train_epoch(0)["train_time_s"]  # the engine's own epoch: every mode, same code path
            if r > 0:  # round 0 warms up (and compiles)
                times[n].append(seconds / args.steps)
            torch.set_num_threads(threads)
    base = statistics.median(times[names[0]])
    print(f"{args.method} width {args.width} batch {args.batch}, {args.rounds} interleaved rounds")
    for n in names:
        med = statistics.median(times[n])
        ratios = [times[names[0]][i] / times[n][i] for i in range(args.rounds)]
        print(
            f"  {n:<11} {args.batch / med:7.1f} img/s (median step {med:.2f} s)  speed-up vs {names[0]}: "
            f"{base / med:.2f}x (per-round {min(ratios):.2f}..{max(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
