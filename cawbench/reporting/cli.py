"""``cawbench report``: render a study's (or a results folder's) report folder, re-render a report folder
from its own data, or write the index of every report (``reports/README.md``)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from cawbench.config import ConfigError

REPORT_HELP = """\
Render a report of a finished (or partly finished) study into a folder: README.md with Markdown tables
and embedded figures, the tables as CSV (the paper comparison also as LaTeX), PNG figures, and data/:
the result rows, finished trials and each run's config, per-epoch metrics and artifacts the report was
rendered from (no checkpoints). Sections: paper comparison (with every known result of ours, one column
per budget), ablation (paired per-seed differences with 95 % t-intervals, against the previous rung and
the reference), search (sensitivity slices; importance and contours only where configurations differ by
more than seeds), optimisation history, depth x width, learning curves, per-layer accuracy, loss terms and
assignment diagnostics per layer, LCS weights, assignment matrices, and cost against each method's
backprop twin. Sections without data are replaced by one line saying why.

TARGET is a study spec (a path or a shipped name such as quickstart), the name of a study in the storage
(e.g. quickstart-cpu), a results folder holding results.jsonl (runs made with `cawbench train`), or a
report folder (re-rendered from its data/ alone: no study, storage or run folders needed).

The report goes to --out, by default OUT_DIR/reports/<study> (a report folder: itself), so that nothing
tracked in the repository changes unless --out says so. Refreshing a checked-in report is explicit, e.g.
`make report-quickstart`.

examples:
  cawbench report quickstart --out-dir runs/quickstart          # -> runs/quickstart/reports/quickstart-cpu
  cawbench report quickstart --out-dir runs/quickstart --out reports/quickstart-cpu   # refresh the checked-in one
  cawbench report reports/quickstart-cpu                        # re-render from its data/, anywhere
  cawbench report caw_ablation --scale paper --out-dir runs/paper
  cawbench report quickstart-cpu --storage postgresql://user:pw@host/db --out-dir /shared/runs
  cawbench report runs/demo                                     # plain training runs
  cawbench report --index                                       # reports/README.md from every report
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="render a study's tables and figures into a report folder (or re-render one, or the index)",
        description=REPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "target", nargs="?", metavar="TARGET", help="study spec, study name, results folder or report folder"
    )
    p.add_argument("--out", help="report folder (default OUT_DIR/reports/<study>; a report folder: itself)")
    p.add_argument("--out-dir", default="runs", help="results folder of the study (default ./runs)")
    p.add_argument("--storage", help="Optuna storage URL or journal path (default OUT_DIR/optuna.journal)")
    p.add_argument("--scale", help="scale of the spec (cpu | paper; default: the spec's default_scale)")
    p.add_argument(
        "--paper-results",
        help="paper results CSV (default: the report folder's copy, else studies/paper_results.csv)",
    )
    p.add_argument(
        "--known-results",
        help="known results CSV for the paper comparison, or 'none' (default: the report folder's copy, "
        "else studies/known_results.csv)",
    )
    p.add_argument(
        "--index",
        nargs="?",
        const="reports",
        metavar="REPORTS_DIR",
        help="write REPORTS_DIR/README.md (default reports/), one line per report folder, from each "
        "folder's data/source.json and REPORTS_DIR/index.yaml",
    )
    p.set_defaults(func=run_report)


def command_line(args: argparse.Namespace, out: Path | None) -> str:
    """The command as a user would type it (flags that were given, the resolved output folder; None: the
    report folder re-rendered in place)."""
    parts = ["cawbench", "report", args.target] + (["--out", str(out)] if out is not None else [])
    if args.out_dir != "runs":
        parts += ["--out-dir", args.out_dir]
    for flag in ("storage", "scale", "paper_results", "known_results"):
        value = getattr(args, flag)
        if value is not None:
            if flag == "storage":
                from cawbench.reporting.source import mask_url

                value = mask_url(value)
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    return shlex.join(parts)


def run_report(args: argparse.Namespace) -> int:
    if args.index is not None:
        from cawbench.reporting.index import write_index

        if args.target is not None:
            raise ConfigError(
                "--index takes the reports folder, not a TARGET (e.g. `cawbench report --index`)"
            )
        path, lines = write_index(Path(args.index))
        print(f"index of {lines} reports written to {path}")
        return 0
    if args.target is None:
        raise ConfigError(
            "give a TARGET (study spec, study name, results folder or report folder), or --index"
        )
    from cawbench.reporting.report import render_report
    from cawbench.reporting.source import load_source

    source = load_source(args.target, args.out_dir, args.storage, args.scale)
    if args.out:
        out = Path(args.out)
    elif source.snapshot is not None:
        out = source.snapshot
    else:
        out = Path(args.out_dir) / "reports" / source.name
    report = render_report(
        source,
        out,
        command_line(args, None if out == source.snapshot and not args.out else out),
        Path(args.paper_results) if args.paper_results else None,
        args.known_results,
    )
    omitted = "; ".join(f"{k}: {v}" for k, v in report.omitted.items())
    print(
        f"report of {source.name} ({len(source.rows)} finished runs): {len(report.tables)} tables, "
        f"{len(report.figures)} figures"
    )
    if omitted:
        print(f"sections not shown: {omitted}")
    print(f"report written to {out / 'README.md'}")
    for line in report.summary:
        print("  " + line.replace("**", ""))
    return 0
