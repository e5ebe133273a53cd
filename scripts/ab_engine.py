"""Interleaved A/B timing of engine variants on one method (shared, noisy cores: compare ratios).

usage: python scripts/ab_engine.py --method caw_conv --width 0.4 --rounds 5 --variants base,unfused,nofusedopt
       python scripts/ab_engine.py --width 1.0 --variants caw_conv:base,deeperforward:base,backprop:base
Each round times one engine epoch (``Trainer.train_epoch``, every mode's own code path) of --steps batches
of every variant in turn, so load changes hit all alike; reported per step. "method:variant" names its own
method. Process settings (glibc keeping freed memory, threads) are the entry point's, as for ``cawbench``:
``--no-keep-cpu-memory``, ``--threads``; run variants that differ in them as separate commands.
To time two checkouts against each other (before/after a change), see scripts/ab_checkouts.py.
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

from cawbench.bench import random_data
from cawbench.cli import configure_process
from cawbench.engine import Trainer
from cawbench.layers import ReluDropoutPool
from cawbench.method import resolve_config

VARIANTS = {  # name -> (config overrides, what it is)
    "base": ({}, "every default"),
    "unfused": ({}, "channel-wise layers as the plain ReLU -> dropout -> pooling composition"),
    "nofusedopt": ({"train.fused_optimizer": False}, "the optimisers' foreach implementation"),
    "unmerged": ({"train.merge_units": "none"}, "train.merge_units=none: each unit clips and steps alone"),
    "merged_steps": ({"train.merge_units": "steps"}, "train.merge_units=steps: no shared loss pieces"),
    "cl": ({}, "channels_last input and weights on the CPU"),
    "compile": ({"train.compile": True}, "torch.compile of every unit"),
    "compile_cl": ({"train.compile": True}, "torch.compile, channels_last"),
    "bf16": ({"train.precision": "bf16"}, "bf16 autocast"),
    "t1": ({}, "one intra-op thread"),
    "pipe2": ({"train.parallel": "pipeline", "train.pipeline_threads": 2}, "two pipeline workers"),
    "compile_pipe2": (
        {"train.parallel": "pipeline", "train.pipeline_threads": 2, "train.compile": True},
        "torch.compile, two pipeline workers",
    ),
}
UNFUSED = {"unfused"}
CHANNELS_LAST = {"cl", "compile_cl"}
THREADS = {"t1": 1}
TITLE = """# Engine variants timed interleaved (scripts/ab_engine.py)

Each block is one run of the command it names: every round times one engine epoch of each variant in turn;
the block lists what its variants are. Compare ratios within a block; img/s across blocks only on idle cores
(each header gives the load average)."""


def build(method: str, width: float, batch: int, steps: int, variant: str) -> Trainer:
    layer = {"method": method, "model.width": width, "train.device": "cpu", "train.progress": False,
             "train.checkpoint": False, "train.batch_size": batch, **VARIANTS[variant][0]}  # fmt: skip
    cfg = resolve_config(layer)
    data = random_data((1, 32, 32), 10, batch * steps, batch, torch.device("cpu"))
    trainer = Trainer(cfg, data=data, write_result=False)
    if variant in UNFUSED:
        for module in trainer.net.modules():
            if isinstance(module, ReluDropoutPool):
                module.fused = False
    if variant in CHANNELS_LAST:
        trainer.channels_last = True
        trainer.net.to(memory_format=torch.channels_last)
    return trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="caw_conv")
    p.add_argument("--width", type=float, default=0.4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1, help="batches per timed epoch")
    p.add_argument("--variants", default="base,unfused", help=f"comma list of: {', '.join(VARIANTS)}")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--keep-cpu-memory", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--out", help="append the result, with the command, date and hardware, to this markdown file"
    )
    args = p.parse_args()
    configure_process(args.threads, args.keep_cpu_memory)
    names = args.variants.split(",")
    trainers = {}
    for n in names:  # "variant" uses --method; "method:variant" names its own method
        method, variant = n.split(":") if ":" in n else (args.method, n)
        if variant not in VARIANTS:
            sys.exit(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
        trainers[n] = build(method, args.width, args.batch, args.steps, variant)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds + 1):
        for n, t in trainers.items():
            threads = torch.get_num_threads()
            torch.set_num_threads(THREADS.get(n.split(":")[-1], threads))
            seconds = t.train_epoch(0)["train_time_s"]
            if r > 0:  # round 0 warms up (and compiles)
                times[n].append(seconds / args.steps)
            torch.set_num_threads(threads)
    base = statistics.median(times[names[0]])
    lines = [f"{args.method} width {args.width} batch {args.batch}, {args.rounds} interleaved rounds"]
    for n in names:
        med = statistics.median(times[n])
        ratios = [times[names[0]][i] / times[n][i] for i in range(args.rounds)]
        lines.append(
            f"  {n:<24} {args.batch / med:7.1f} img/s (median step {med:.2f} s)  speed-up vs {names[0]}: "
            f"{base / med:.2f}x (per-round {min(ratios):.2f}..{max(ratios):.2f})"
        )
    print("\n".join(lines))
    if args.out:
        used = dict.fromkeys(n.split(":")[-1] for n in names)
        legend = "variants: " + "; ".join(f"`{v}` {VARIANTS[v][1]}" for v in used)
        write_markdown(Path(args.out), lines, notes=[legend])


def write_markdown(
    path: Path, lines: list[str], title: str = TITLE, fenced: bool = True, notes: list[str] = ()
) -> None:
    """Append one block: the command, date, hardware and versions, then the printed result (``title``
    starts a new file; ``fenced=False`` for lines that are markdown already; ``notes``: more header lines)."""
    from cawbench.bench import describe_device
    from cawbench.engine import software_versions

    v = software_versions()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    header = [
        f"- command: `{command}`",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S +0000')}",
        f"- hardware: {describe_device(torch.device('cpu'))}; load average at the end "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- versions: cawbench {v.get('cawbench')} (git {v.get('git', '?')}), torch {torch.__version__}",
        *(f"- {note}" for note in notes),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        header = [title, "", *header]
    body = "\n".join(lines)
    with path.open("a") as f:
        f.write("\n".join(header) + "\n\n" + (f"```\n{body}\n```" if fenced else body) + "\n\n")


if __name__ == "__main__":
    main()
