"""Time two checkouts against each other: ``cawbench bench`` of each, alternated round by round.

usage: python scripts/ab_checkouts.py --tree before=/path/to/old/checkout --tree after=. --rounds 3 \
           --out reports/bench/cpu-before-after.md -- \
           --methods caw_conv,deeperforward,backprop --arch resnet17 --width 1.0 --device cpu

Every round runs the same ``cawbench bench`` command (the arguments after ``--``) once in each checkout (see
:func:`command` for how), in alternating order (A B, B A, ...), so that a change of load on shared cores hits both alike. Each run writes its own
``cpu.csv``; the summary gives, per row label, the median training img/s over rounds in each checkout and
the ratio of the medians with its per-round range. Process options for ``cawbench`` go in ``--cawbench-opt``
(e.g. ``--cawbench-opt=--threads=2``). Set ``OMP_WAIT_POLICY`` in the environment as for any run.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path


def command(tree: str) -> list[str]:
    """How to run ``cawbench`` of a checkout: its ``.venv/bin/cawbench``; else, for a bare source tree
    (e.g. ``git archive COMMIT | tar -x -C DIR``), this Python on its ``scripts/cawbench_inplace.py``; or
    TREE is the executable itself."""
    path = Path(tree).resolve()
    if (path / ".venv" / "bin" / "cawbench").is_file():
        return [str(path / ".venv" / "bin" / "cawbench")]
    if (path / "scripts" / "cawbench_inplace.py").is_file():
        return [sys.executable, str(path / "scripts" / "cawbench_inplace.py")]
    if path.is_file():
        return [str(path)]
    sys.exit(f"{tree}: neither a checkout (with .venv or scripts/cawbench_inplace.py) nor an executable")


def describe(tree: str) -> str:
    try:
        out = subprocess.run(["git", "-C", tree, "log", "-1", "--format=%h %s"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "(not a git checkout)"
    return out.stdout.strip()[:100] or "(not a git checkout)"


def read_ips(csv_path: Path) -> dict[str, float]:
    with csv_path.open() as fh:
        return {r["label"]: float(r["train_ips"]) for r in csv.DictReader(fh) if r.get("train_ips")}


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, metavar="NAME=PATH", help="two (or more)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cawbench-opt", action="append", default=[], help="process option for every run")
    p.add_argument("--out", help="append the summary (command, date, load, per-round numbers) here")
    p.add_argument("--keep-runs", help="folder for each run's bench output (default: a temporary one)")
    args = p.parse_args(argv[:split])
    bench_args = argv[split + 1 :]
    if any(a == "--out" or a.startswith("--out=") for a in bench_args):
        sys.exit("the bench's --out is set per run by this script; leave it out")
    trees = dict(t.split("=", 1) for t in args.tree)
    exes = {name: command(path) for name, path in trees.items()}
    runs = Path(args.keep_runs or tempfile.mkdtemp(prefix="ab_checkouts_"))
    ips: dict[str, list[dict[str, float]]] = {name: [] for name in exes}
    for r in range(args.rounds):
        order = list(exes) if r % 2 == 0 else list(reversed(exes))
        for name in order:
            out = runs / f"{name}-r{r}"
            cmd = [*exes[name], *args.cawbench_opt, "bench", *bench_args, "--out", str(out)]
            print(f"round {r + 1}/{args.rounds}, {name}: {shlex.join(cmd)}", flush=True)
            subprocess.run(cmd, check=True)
            ips[name].append(read_ips(out / "cpu.csv"))
    names = list(exes)
    labels = list(dict.fromkeys(label for name in names for rnd in ips[name] for label in rnd))
    first = names[0]
    lines = [f"train img/s, median over {args.rounds} alternated rounds (per round in brackets)"]
    for label in labels:
        for name in names:
            per_round = [rnd.get(label) for rnd in ips[name]]
            got = [v for v in per_round if v is not None]
            if not got:
                continue
            med = statistics.median(got)
            text = f"  {label:<24} {name:<8} {med:8.1f}  [{', '.join(f'{v:.1f}' for v in got)}]"
            base = [rnd.get(label) for rnd in ips[first]]
            if name != first and all(v is not None for v in base + per_round):
                ratios = [a / b for a, b in zip(per_round, base, strict=True)]
                text += (
                    f"  {med / statistics.median(base):.2f}x {first} "
                    f"(per round {min(ratios):.2f}..{max(ratios):.2f})"
                )
            lines.append(text)
    print("\n".join(lines))
    print(f"bench reports of every run: {runs}")
    if args.out:
        header = [
            f"- command: `python scripts/ab_checkouts.py {shlex.join(sys.argv[1:])}`",
            f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S +0000')}; load average at "
            f"the end {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
            *(f"- {name}: `{trees[name]}` at {describe(trees[name])}" for name in names),
        ]
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        title = "" if path.exists() else "# Checkouts timed against each other (scripts/ab_checkouts.py)\n\n"
        body = "\n".join(lines)
        with path.open("a") as f:
            f.write(title + "\n".join(header) + f"\n\n```\n{body}\n```\n\n")


if __name__ == "__main__":
    main()
