"""``cawbench study run|status|list``: Optuna studies from YAML specs, tracked in MLflow."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

RUN_HELP = """\
Run (or resume) a study. Trials are stored in Optuna storage (default: the journal file
OUT_DIR/optuna.journal; --storage postgresql://user:pass@host:5432/db for several machines) and
tracked in MLflow (default sqlite:///OUT_DIR/mlflow.db; browse with
`mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`). Re-running the same command resumes:
finished trials are never re-run, interrupted ones are retried. Result rows go to OUT_DIR/results.jsonl.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("study", help="run, inspect and list Optuna studies (specs in studies/*.yaml)")
    study_sub = p.add_subparsers(dest="study_command", metavar="STUDY_COMMAND")
    study_sub.required = True

    run = study_sub.add_parser("run", help="run or resume a study", description=RUN_HELP)
    _common(run)
    run.add_argument(
        "--n-trials", type=int, help="configurations to draw (tpe/random/qmc); default: the spec's"
    )
    run.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    run.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default sqlite:///OUT_DIR/mlflow.db; 'off')"
    )
    run.add_argument("--device", help="override train.device for every trial (auto | cpu | cuda | cuda:N)")
    run.add_argument("--threads", type=int, help="torch CPU threads per worker (default: cores / workers)")
    run.add_argument(
        "--retry-failed", action="store_true", help="re-queue trials that failed (e.g. diverged)"
    )
    run.add_argument("--heartbeat", type=int, default=None, help="heartbeat interval in seconds (default 20)")
    # Set by the --workers launcher for its child processes.
    run.add_argument("--worker-label", default="w1", help=argparse.SUPPRESS)
    run.add_argument("--status-file", help=argparse.SUPPRESS)
    run.add_argument("--no-echo", action="store_true", help=argparse.SUPPRESS)
    run.set_defaults(func=run_command)

    status = study_sub.add_parser("status", help="trial counts, each configuration over seeds, failures")
    _common(status)
    status.set_defaults(func=status_command)

    lst = study_sub.add_parser("list", help="shipped study specs and the studies in a storage")
    lst.add_argument("--out-dir", default="runs", help="results folder (default ./runs)")
    lst.add_argument("--storage", help="Optuna storage URL or journal path (default OUT_DIR/optuna.journal)")
    lst.set_defaults(func=list_command)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "spec", metavar="SPEC", help="a spec file, or the name of one in studies/ (e.g. quickstart)"
    )
    p.add_argument("--scale", help="cpu | paper (a scale of the spec; default: its default_scale)")
    p.add_argument("--out-dir", default="runs", help="results folder (default ./runs)")
    p.add_argument("--storage", help="Optuna storage URL or journal path (default OUT_DIR/optuna.journal)")


def run_command(args: argparse.Namespace) -> int:
    from cawbench.studies.runner import RunOptions, failure_report, format_summary, run_study
    from cawbench.studies.spec import load_spec
    from cawbench.studies.storage import DEFAULT_HEARTBEAT_S

    spec = load_spec(args.spec)
    if args.workers < 1:
        from cawbench.config import ConfigError

        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    opts = RunOptions(
        spec=spec, scale=args.scale, out_dir=Path(args.out_dir), storage_url=args.storage,
        tracking_uri=args.tracking_uri, n_trials=args.n_trials, workers=args.workers,
        heartbeat_interval=args.heartbeat or DEFAULT_HEARTBEAT_S, retry_failed=args.retry_failed,
        worker_label=args.worker_label, status_file=Path(args.status_file) if args.status_file else None,
        echo_progress=not args.no_echo, threads=args.threads, device=args.device,
    )  # fmt: skip
    summary = run_study(opts)
    if not args.no_echo:
        print(format_summary(summary))
    failures = failure_report(summary) if args.status_file is None else None  # the launcher reports
    if failures is not None:
        print(f"cawbench: error: {failures}", file=sys.stderr)
        return 1
    return 1 if summary.get("worker_errors") else 0


def status_command(args: argparse.Namespace) -> int:
    from cawbench.studies.runner import format_summary, load_study_for, summarize
    from cawbench.studies.spec import load_spec

    spec = load_spec(args.spec, check=False)
    scale = spec.check_scale(args.scale)
    study = load_study_for(spec, scale, Path(args.out_dir), args.storage)
    print(format_summary(summarize(study, spec, scale)))
    return 0


def list_command(args: argparse.Namespace) -> int:
    import optuna

    from cawbench.config import ConfigError
    from cawbench.studies.spec import parse_spec, shipped_specs_dir
    from cawbench.studies.storage import default_journal, open_storage

    folders = [f for f in dict.fromkeys([Path.cwd() / "studies", shipped_specs_dir()]) if f.is_dir()]
    print("study specs:")
    for folder in folders:
        for path in sorted(folder.glob("*.yaml")):
            import yaml

            try:
                spec = parse_spec(yaml.safe_load(path.read_text()), str(path))
                detail = f"{spec.sampler_name}, scales {'/'.join(spec.scales)}"
                desc = spec.description.splitlines()[0] if spec.description else ""
            except (ConfigError, yaml.YAMLError) as exc:
                detail, desc = "INVALID", str(exc)
            print(f"  {path.stem:<20} {detail:<28} {desc[:70]}")
    out_dir = Path(args.out_dir)
    if args.storage is None and not default_journal(out_dir).is_file():
        print(f"no studies yet in {default_journal(out_dir)}")
        return 0
    handle = open_storage(args.storage, out_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    summaries = optuna.get_all_study_summaries(handle.storage, include_best_trial=True)
    print(f"studies in {handle.display}:")
    for s in sorted(summaries, key=lambda s: s.study_name):
        best = f"best {s.best_trial.value:.2f}" if s.best_trial is not None else "no complete trial"
        print(f"  {s.study_name:<32} {s.n_trials:>5} trials  {best}")
    return 0
