"""Interleaved A/B timing of engine variants on one method (shared, noisy cores: compare ratios).

usage: python scripts/ab_engine.py --method caw_conv --width 0.4 --rounds 5 --variants base,fastdrop,fusedact,standin_caw:base
(keep_cpu_memory is process-wide: time "fused" and the other variants that keep it on in their own run)
(standin_caw = scripts/standin.py: the spec's CAW layer written the plain way, i.e. the authors' loop shape)
Each round times one engine epoch of --steps batches of every variant in turn, so load changes hit all alike;
reported per step.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cawbench.bench import random_data  # noqa: E402
from cawbench.engine import Trainer  # noqa: E402
from cawbench.method import list_methods, resolve_config  # noqa: E402

NO_KEEP = {"train.keep_cpu_memory": False, "train.cpu_conv": "plain"}  # the steps before those two
VARIANTS = {  # name -> (config overrides, channels_last on this device)
    # the CPU work step by step: plain PyTorch chain -> bulk dropout draws -> fused ReLU-dropout-pooling
    # node -> glibc keeping freed memory -> convs planned by shape -> Winograd where it pays (the defaults)
    "base": ({"train.fused_optimizer": False, "train.fast_dropout": False, **NO_KEEP}, False),
    "fastdrop": (NO_KEEP, False),  # units unfused (see UNFUSED)
    "fusedact": (NO_KEEP, False),
    "fused": ({}, False),  # every default on
    "unmerged": ({"train.merge_units": "none"}, False),  # every default but each unit updating on its own
    "merged_steps": ({"train.merge_units": "steps"}, False),  # merged updates without shared loss pieces
    "plainconv": ({"train.cpu_conv": "plain"}, False),  # every default but the shape-planned CPU convs
    "direct": ({"train.cpu_conv": "direct"}, False),  # planned convs without Winograd
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
TITLE = """# Engine variants timed interleaved (scripts/ab_engine.py)

Each block is one run of the command it names: every round times one engine epoch of each variant in turn.
Variants: `base` the plain PyTorch chain (nn.Dropout, unfused ReLU/dropout/pooling, glibc's default malloc,
plain convs), `fastdrop` + bulk-drawn dropout, `fusedact` + the fused ReLU-dropout-pooling node,
`plainconv` + glibc keeping freed memory and fused CPU AdamW, `direct` + convs planned by shape
(`train.cpu_conv=direct`), `fused` every default (+ Winograd for the 3x3 stride-1 convs, `train.cpu_conv=tuned`:
F(2x2, 3x3) in the block of 2026-11-28 00:30, F(4x4, 3x3) after; blocks before a switch existed call every
default of their day `fused`); `unmerged` every default but `train.merge_units=none` (each unit clips and
steps on its own, the engine before merged updates), `merged_steps` merged updates without shared loss pieces;
`standin_caw` is scripts/standin.py, the spec's CAW layer written the plain way. `train.keep_cpu_memory` is
process-wide, so `plainconv`, `direct` and `fused` run in their own process: compare their img/s with the block before
on idle cores (each header gives the load average)."""
UNFUSED = {"fastdrop"}  # channel-wise units forced onto the unfused ReLU -> dropout -> pooling chain
THREADS = {"t1": 1, "fused_t1": 1, "compile_t1": 1}


def build(
    method: str, width: float, batch: int, steps: int, overrides: dict, channels_last: bool, unfused: bool
) -> Trainer:
    layer = {"method": method, "model.width": width, "train.device": "cpu", "train.progress": False,
             "train.checkpoint": False, "train.batch_size": batch, **overrides}  # fmt: skip
    cfg = resolve_config(layer)
    data = random_data((1, 32, 32), 10, batch * steps, batch, torch.device("cpu"))
    trainer = Trainer(cfg, data=data, write_result=False)
    if unfused:
        for unit in trainer.net.units:
            unit.fused = False
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
    p.add_argument("--variants", default="base,fastdrop,fusedact")
    p.add_argument(
        "--out", help="append the result, with the command, date and hardware, to this markdown file"
    )
    args = p.parse_args()
    names = args.variants.split(",")
    keeps = {VARIANTS[n.split(":")[-1]][0].get("train.keep_cpu_memory", True) for n in names}
    if len(keeps) > 1:  # the first keeping trainer changes malloc for the whole process
        sys.exit("train.keep_cpu_memory is process-wide: time variants with and without it in separate runs")
    trainers = {}
    for n in names:  # "variant" uses --method; "method:variant" names its own method
        method, variant = n.split(":") if ":" in n else (args.method, n)
        if method == "standin_caw" and "standin_caw" not in list_methods():
            import standin

            standin.register()
        trainers[n] = build(
            method, args.width, args.batch, args.steps, *VARIANTS[variant], variant in UNFUSED
        )
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
    lines = [f"{args.method} width {args.width} batch {args.batch}, {args.rounds} interleaved rounds"]
    for n in names:
        med = statistics.median(times[n])
        ratios = [times[names[0]][i] / times[n][i] for i in range(args.rounds)]
        lines.append(
            f"  {n:<20} {args.batch / med:7.1f} img/s (median step {med:.2f} s)  speed-up vs {names[0]}: "
            f"{base / med:.2f}x (per-round {min(ratios):.2f}..{max(ratios):.2f})"
        )
    print("\n".join(lines))
    if args.out:
        write_markdown(Path(args.out), lines)


def write_markdown(path: Path, lines: list[str], title: str = TITLE, fenced: bool = True) -> None:
    """Append one block: the command, date, hardware and versions, then the printed result (``title``
    starts a new file; ``fenced=False`` for lines that are markdown already)."""
    from cawbench.bench import describe_device
    from cawbench.engine import _versions

    v = _versions()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    header = [
        f"- command: `{command}`",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S +0000')}",
        f"- hardware: {describe_device(torch.device('cpu'))}; load average at the end "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- versions: cawbench {v.get('cawbench')} (git {v.get('git', '?')}), torch {torch.__version__}",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        header = [title, "", *header]
    body = "\n".join(lines)
    with path.open("a") as f:
        f.write("\n".join(header) + "\n\n" + (f"```\n{body}\n```" if fenced else body) + "\n\n")


if __name__ == "__main__":
    main()
