"""Training images/s of caw_conv (and deeperforward) beside backprop on the same ResNet-17, same process.

32x32 single-channel input (synthetic data resized to 32), batch 128, through the engine's own
``Trainer.train_epoch``. Rounds alternate the methods (A B A B ...) so that a noisy, shared machine hurts
them alike; the first round is a warm-up and is not reported. Prints one line per (width, method) with the
median images/s of the measured rounds and the ratio to backprop.

    python scripts/caw_throughput.py --widths 1.0 0.4 --batches 3 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics

import torch

from cawbench.engine import Trainer
from cawbench.method import resolve_config


def trainer(method: str, width: float, batches: int, device: str, channels_last: bool = False) -> Trainer:
    cfg = resolve_config(
        {
            "method": method,
            "data.name": "synthetic",
            "data.image_size": 32,
            "data.subset": 128 * batches,
            "model.width": width,
            "train.batch_size": 128,
            "train.epochs": 100,
            "train.device": device,
            "train.progress": False,
            "train.checkpoint": False,
        }
    )
    t = Trainer(cfg, write_result=False)
    if channels_last and not t.channels_last:  # the engine uses channels_last on CUDA only: try it on CPU
        t.channels_last = True
        t.net.to(memory_format=torch.channels_last)
    return t


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.4])
    parser.add_argument("--methods", nargs="+", default=["backprop", "caw_conv"])
    parser.add_argument("--batches", type=int, default=3, help="batches of 128 per timed epoch")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels-last", action="store_true", help="channels_last on CPU as well")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for width in args.widths:
        trainers = {m: trainer(m, width, args.batches, args.device, args.channels_last) for m in args.methods}
        rates: dict[str, list[float]] = {m: [] for m in args.methods}
        for round_index in range(args.rounds + 1):
            for method, t in trainers.items():
                rate = t.train_epoch(round_index)["train_images_per_s"]
                if round_index > 0:
                    rates[method].append(rate)
        base = statistics.median(rates[args.methods[0]])
        for method in args.methods:
            med = statistics.median(rates[method])
            runs = ", ".join(f"{r:.1f}" for r in rates[method])
            print(f"width {width:g}  {method:<14} {med:8.1f} img/s (rounds: {runs})  "
                  f"x{med / base:.2f} of {args.methods[0]}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
