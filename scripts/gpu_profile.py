"""Where a training step's device time goes: top kernels of one CAW-Conv (or other method) step.

Profiles a few eager training steps (after warm-up) with torch.profiler and reports, per step: wall time,
summed kernel time, kernel count, and the kernels that take the most time. A CUDA graph replays the same
kernels, so this is also the graph's work list. Output: a JSON summary (for scripts/gpu_check.py).
usage: python scripts/gpu_profile.py --method caw_conv --width 1.0 --device cuda --json FILE
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cawbench_inplace  # noqa: E402

cawbench_inplace.setup()

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from cawbench.bench import random_data  # noqa: E402
from cawbench.engine import Trainer  # noqa: E402
from cawbench.method import resolve_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="caw_conv")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--input", type=int, default=32, help="square 1-channel input size")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
    p.add_argument("--json")
    args = p.parse_args()
    from cawbench.config import parse_override

    layer = {"method": args.method, "model.width": args.width, "train.device": args.device,
             "train.batch_size": args.batch, "train.progress": False, "train.checkpoint": False,
             **dict(parse_override(s) for s in args.set)}  # fmt: skip
    cfg = resolve_config(layer)
    device = torch.device(args.device)
    data = random_data((1, args.input, args.input), 10, args.batch, args.batch, device, "fashion-mnist")
    trainer = Trainer(cfg, data=data, write_result=False)
    trainer.net.train()
    x, y = next(trainer._batches("train", 0, train=True))

    def step() -> None:
        trainer.step(x, y, trainer.step_state(0, 0, trainer.new_stats()))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall = (time.perf_counter() - start) / args.steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()
    events = prof.key_averages()
    on_device = device.type == "cuda"

    def own_time(e) -> float:  # microseconds
        return float(e.self_device_time_total if on_device else e.self_cpu_time_total)

    kernels = [e for e in events if own_time(e) > 0 and (not on_device or e.device_type.name == "CUDA")]
    kernels.sort(key=own_time, reverse=True)
    total = sum(own_time(e) for e in kernels)
    summary = {
        "method": args.method, "width": args.width, "batch": args.batch, "device": str(device),
        "overrides": args.set, "wall_ms_per_step": 1e3 * wall,
        "kernel_ms_per_step": total / 1e3 / args.steps,
        "kernels_per_step": sum(e.count for e in kernels) / args.steps,
        "top": [{"name": e.key[:90], "ms_per_step": own_time(e) / 1e3 / args.steps,
                 "calls_per_step": e.count / args.steps, "share": own_time(e) / total if total else None}
                for e in kernels[:25]],
    }  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if k != "top"}))
    for row in summary["top"][:12]:
        print(f"  {row['ms_per_step']:8.3f} ms  {row['calls_per_step']:6.1f}x  {row['name']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
