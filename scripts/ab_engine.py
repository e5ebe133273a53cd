"""Interleaved A/B timing of engine variants on one method (shared, noisy cores: compare ratios).

usage: python scripts/ab_engine.py --method standin_caw --width 0.4 --rounds 5 --variants base,fused,cl
Each round times one training step of every variant in turn (same batch), so load changes hit all alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cawbench.bench import random_data  # noqa: E402
from cawbench.engine import StepStats, Trainer  # noqa: E402
from cawbench.method import StepContext, list_methods, resolve_config  # noqa: E402

VARIANTS = {  # name -> (config overrides, channels_last on this device)
    "base": ({"train.fused_optimizer": False}, False),
    "fused": ({}, False),
    "cl": ({"train.fused_optimizer": False}, True),
    "fused_cl": ({}, True),
    "compile": ({"train.compile": True}, False),
    "compile_cl": ({"train.compile": True}, True),
    "bf16": ({"train.precision": "bf16"}, False),
    "t1": ({"train.fused_optimizer": False}, False),  # base with one intra-op thread
}
THREADS = {"t1": 1}


def build(method: str, width: float, batch: int, overrides: dict, channels_last: bool) -> Trainer:
    layer = {"method": method, "model.width": width, "train.device": "cpu", "train.progress": False,
             "train.checkpoint": False, "train.batch_size": batch, **overrides}  # fmt: skip
    cfg = resolve_config(layer)
    data = random_data((1, 32, 32), 10, batch, batch, torch.device("cpu"))
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
    p.add_argument("--variants", default="base,fused")
    args = p.parse_args()
    if args.method == "standin_caw" and "standin_caw" not in list_methods():
        import standin

        standin.register()
    names = args.variants.split(",")
    trainers = {n: build(args.method, args.width, args.batch, *VARIANTS[n]) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds + 1):
        for n, t in trainers.items():
            x, y = next(t._batches("train", 0, train=True))
            weights = t.method.loss_weights(0)
            active = [True] * len(t.units)
            threads = torch.get_num_threads()
            torch.set_num_threads(THREADS.get(n, threads))
            start = time.perf_counter()
            t.step(x, y, StepContext(0, 1, 0), weights, active, StepStats(len(t.units), t.device))
            if r > 0:  # round 0 warms up (and compiles)
                times[n].append(time.perf_counter() - start)
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
