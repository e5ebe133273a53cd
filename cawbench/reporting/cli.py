"""``cawbench report``: render a study's (or a results folder's) report folder."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

REPORT_HELP = """\
Render a report of a finished (or partly finished) study into a folder: README.md with Markdown tables
and embedded figures, the tables as CSV (the paper comparison also as LaTeX) and PNG figures: paper
comparison, ablation with paired-seed deltas, sensitivity and parameter importance, depth x width
heatmaps, learning curves, per-layer accuracy, LCS weights, assignment matrices and a cost table.
Sections without data are replaced by one line saying why.

TARGET is a study spec (a path or a shipped name such as quickstart), the name of a study in the storage
(e.g. quickstart-cpu), or a results folder holding results.jsonl (runs made with `cawbench train`).

examples:
  cawbench report quickstart                       # study quickstart-cpu in runs/optuna.journal
  cawbench report caw_ablation --scale paper --out reports/caw_ablation-paper
  cawbench report quickstart-cpu --storage postgresql://user:pw@host/db --out-dir /shared/runs
  cawbench report runs/demo                        # plain training runs
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="render a study's tables and figures into a report folder",
        description=REPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="SPEC-or-STUDY", help="study spec, study name or results folder")
    p.add_argument("--out", help="report folder (default reports/<study name>)")
    p.add_argument("--out-dir", default="runs", help="results folder of the study (default ./runs)")
    p.add_argument("--storage", help="Optuna storage URL or journal path (default OUT_DIR/optuna.journal)")
    p.add_argument("--scale", help="scale of the spec (cpu | paper; default: the spec's default_scale)")
    p.add_argument(
        "--paper-results", help="paper results CSV (default: studies/paper_results.csv of the project)"
    )
    p.set_defaults(func=run_report)


def command_line(args: argparse.Namespace, out: Path) -> str:
    """The command as a user would type it (flags that were given, the resolved output folder)."""
    parts = ["cawbench", "report", args.target, "--out", str(out)]
    if args.out_dir != "runs":
        parts += ["--out-dir", args.out_dir]
    for flag in ("storage", "scale", "paper_results"):
        value = getattr(args, flag)
        if value is not None:
            if flag == "storage":
                from cawbench.reporting.source import mask_url

                value = mask_url(value)
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    return shlex.join(parts)


def run_report(args: argparse.Namespace) -> int:
    from cawbench.reporting.report import render_report
    from cawbench.reporting.source import load_source

    source = load_source(args.target, args.out_dir, args.storage, args.scale)
    out = Path(args.out) if args.out else Path("reports") / source.name
    report = render_report(
        source,
        out,
        command_line(args, out),
        Path(args.paper_results) if args.paper_results else None,
    )
    shown = len(report.figures)
    omitted = "; ".join(f"{k}: {v}" for k, v in report.omitted.items())
    print(
        f"report of {source.name} ({len(source.rows)} finished runs): {len(report.tables)} tables, "
        f"{shown} figures"
    )
    if omitted:
        print(f"sections not shown: {omitted}")
    print(f"report written to {out / 'README.md'}")
    return 0
