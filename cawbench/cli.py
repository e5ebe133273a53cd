"""The ``cawbench`` command line: train, list (and study, report, bench where installed)."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import importlib
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cawbench.config import ConfigError, load_yaml, parse_override
from cawbench.data import DataError
from cawbench.registry import RegistryError
from cawbench.results import ResultsFileError

#: modules that each add one subcommand: ``add_parser(subparsers)`` registers it with ``func=run``
COMMAND_MODULES = ["cawbench.cli", "cawbench.studies.cli", "cawbench.reporting.cli", "cawbench.bench"]

#: errors that are the user's input or environment (answered with one line and exit code 2); anything else
#: is a bug and shows its traceback. OSError: a folder that cannot be written, a full disk, ...
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DataError,
    RegistryError,
    ResultsFileError,
    OSError,
)
BUG_REPORT = (
    "cawbench: internal error (a bug, not your input): please report it with the command line and the "
    "traceback above"
)

TRAIN_FLAGS = {  # flag -> config key
    "method": "method",
    "dataset": "data.name",
    "arch": "model.arch",
    "width": "model.width",
    "depth": "model.depth",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "subset": "data.subset",
    "test_subset": "data.test_subset",
    "seed": "train.seed",
    "device": "train.device",
    "data_dir": "data.data_dir",
    "out_dir": "out_dir",
    "recipe": "recipe",
    "readout": "readout.name",
    "run_name": "run_name",
    "variant": "variant",
}


TRAIN_DESCRIPTION = """\
Train one method on one dataset and print its result row.

The configuration is resolved in this order (later wins):
  built-in defaults -> the method's defaults -> the recipe for the dataset (--recipe paper)
  -> --config YAML -> the flags below -> KEY=VALUE overrides of any config key,
  e.g.  optim.lr=0.01  params.lambda_entropy=0.1  data.image_size=32
The resolved config is saved beside the result in OUT_DIR/runs/<run-name>/config.yaml and the
result row is appended to OUT_DIR/results.jsonl. Accuracies are in %; "final" is the last epoch
with the readout fitted on the validation split (test labels are never used for any choice).

examples:
  cawbench train --method backprop --dataset fashion-mnist --width 0.25 --epochs 1 --subset 10000
  cawbench train --method caw_conv --dataset cifar10 --recipe paper --device cuda
  cawbench train -c my.yaml optim.lr=0.02 --resume --run-name my-run
"""


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train one configuration and print its result row",
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", "-m", help="method name (see `cawbench list`); default backprop")
    p.add_argument("--dataset", "-d", help="dataset name; default fashion-mnist")
    p.add_argument("--arch", help="architecture; default resnet17 (or the recipe's)")
    p.add_argument("--width", type=float, help="channel width multiplier (1.0 = the paper's widths)")
    p.add_argument("--depth", type=int, help="blocks per stage (ResNet: 2 = ResNet-17)")
    p.add_argument("--epochs", type=int, help="training epochs")
    p.add_argument("--batch-size", type=int, help="training batch size")
    p.add_argument("--subset", type=int, help="use only this many training images")
    p.add_argument("--test-subset", type=int, help="evaluate on only this many test images")
    p.add_argument(
        "--seed", type=int, help="training seed (the train/val split has its own, data.split_seed)"
    )
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--data-dir", help="folder holding the dataset files (else $CAWBENCH_DATA, system paths)")
    p.add_argument("--out-dir", help="results folder (default ./runs)")
    p.add_argument("--recipe", help="default | paper (the authors' recipe for this dataset)")
    p.add_argument("--readout", help="main readout: last, sum, sip, lcs, softmax_sum, ...")
    p.add_argument(
        "--run-name", help="name of the run folder (default: derived from the config and its hash)"
    )
    p.add_argument("--variant", help="label stored with the result (e.g. an ablation variant)")
    p.add_argument("--config", "-c", help="YAML file with config keys (nested or dotted)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", help="config override")
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run folder's checkpoint (a finished run is left as it is, no new row)",
    )
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run folder that already holds a run (by default that is refused)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (same as --set)")
    p.set_defaults(func=run_train)


def train_config_from_args(args: argparse.Namespace):
    from cawbench.method import resolve_config

    layers: list[dict[str, Any]] = []
    if args.config:
        layers.append(load_yaml(args.config))
    flags = {key: getattr(args, flag) for flag, key in TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    if args.no_progress:
        flags["train.progress"] = False
    layers.append(flags)
    layers.append(dict(parse_override(o) for o in [*args.set, *args.overrides]))
    return resolve_config(*layers)


def run_train(args: argparse.Namespace) -> int:
    from cawbench import run_folder
    from cawbench.engine import Trainer, run_dir_for

    cfg = train_config_from_args(args)
    # Refuse an unusable --out-dir or an existing run before the data are loaded.
    run_dir = run_dir_for(cfg)
    held = run_folder.check(run_dir, Path(cfg.out_dir), resume=args.resume, overwrite=args.overwrite)
    if held is not None and args.overwrite:
        print(f"cawbench: note: --overwrite: replacing the {held} run in {run_dir} (an earlier row of it in "
              "results.jsonl stays, but its files are gone)", file=sys.stderr)  # fmt: skip
    trainer = Trainer(cfg)
    if len(trainer.data.val) == 0:
        print(f"cawbench: note: data.val_size={cfg.data.val_size:g} leaves no validation split: the validation "
              "accuracies are empty and test_acc_at_best_val is the last epoch's", file=sys.stderr)  # fmt: skip
    print(f"training {cfg.method} on {cfg.data.name} ({trainer.data.source}) with {cfg.model.arch} "
          f"width {cfg.model.width:g} on {trainer.device}; run folder {trainer.run_dir}")  # fmt: skip
    result = trainer.run(resume=args.resume, overwrite=args.overwrite)
    if trainer.already_finished:
        print(f"run {trainer.run_dir} is already finished ({result.get('epochs')} epoch(s), "
              f"{result.get('finished_at')}); nothing to do, no new row. Its result:")  # fmt: skip
    print(format_result(result))
    return 0


def format_result(row: dict[str, Any]) -> str:
    """A small human table of one result row."""

    def pct(v: Any) -> str:
        return "–" if v is None else f"{v:.2f}"

    lines = [
        f"{'method':<14}{'dataset':<15}{'arch':<10}{'width':>6}{'seed':>6}  {'readout':<10}"
        f"{'val':>7}{'test':>7}{'test@best-val':>15}{'max test':>10}{'time s':>9}",
        f"{row['method']:<14}{row['dataset']:<15}{row['arch']:<10}{row['width']:>6g}{row['seed']:>6}  "
        f"{row['readout']:<10}{pct(row['final_val_acc']):>7}{pct(row['final_test_acc']):>7}"
        f"{pct(row['test_acc_at_best_val']):>15}{pct(row['max_test_acc']):>10}{row['wall_time_s']:>9.1f}",
    ]
    layers = row.get("per_layer_test_acc") or []
    if len(layers) > 1:
        lines.append("per-layer test accuracy: " + " ".join(f"{v:.1f}" for v in layers))
    extra = {k: v for k, v in (row.get("final_test_acc_by_readout") or {}).items() if k != row["readout"]}
    if extra:
        lines.append("other readouts (test): " + ", ".join(f"{k} {v:.2f}" for k, v in extra.items()))
    lines.append(
        f"accuracies in %; final = last epoch, readout fitted on validation; result row in {row['run_dir']}"
    )
    return "\n".join(lines)


def _add_list(sub: Any) -> None:
    p = sub.add_parser("list", help="list methods, datasets, architectures, readouts and recipes")
    p.add_argument(
        "what", nargs="?", default="all", choices=["all", "methods", "datasets", "archs", "readouts"]
    )
    p.set_defaults(func=run_list)


def run_list(args: argparse.Namespace) -> int:
    from cawbench.archs import ARCHS
    from cawbench.data import DATASETS
    from cawbench.method import METHODS, method_report_info, recipes_of, reference_method
    from cawbench.readouts import READOUTS

    if args.what in ("all", "methods"):
        print("methods:")
        reference = reference_method()
        for name in METHODS.names():
            cls, info = METHODS.get(name), method_report_info(name)
            recipes = ", ".join(f"{r}[{'/'.join(sorted(t))}]" for r, t in recipes_of(cls).items()) or "-"
            print(f"  {name:<15} {cls.description}\n  {'':<15} recipes: {recipes}")
            twin = f"; BP twin: {reference} --recipe {info.bp_twin}" if info.bp_twin else ""
            print(f"  {'':<15} reported as {info.label}{twin}")
    if args.what in ("all", "datasets"):
        print("datasets: " + ", ".join(DATASETS.names()))
    if args.what in ("all", "archs"):
        print("architectures: " + ", ".join(ARCHS.names()))
    if args.what in ("all", "readouts"):
        print("readouts:")
        for name in READOUTS.names():
            print(f"  {name:<15} {READOUTS.get(name).description}")
    return 0


def add_parser(sub: Any) -> None:
    _add_train(sub)
    _add_list(sub)


# --------------------------------------------------------------------------------- the process
def keep_freed_cpu_memory() -> bool:
    """Have glibc's malloc serve every block from its heap and keep freed memory (process-wide; no-op and
    False elsewhere). By default glibc maps blocks over 32 MiB (a 128x100x32x32 activation) afresh each time
    and returns them on free, so each such tensor pays a page-fault pass; measured here, a 52 MB clone took
    17.8 ms instead of 2.0 ms. The cost: the process keeps its peak heap until it exits."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def configure_process(threads: int | None = None, keep_cpu_memory: bool = True) -> None:
    """Settings of the whole process, made once by the entry point (``cawbench`` and the scripts), never by
    a library constructor: torch's intra-op threads (None: torch's default, one per core) and glibc keeping
    freed memory (:func:`keep_freed_cpu_memory`). ``OMP_WAIT_POLICY`` is read when torch is loaded, so it
    is set in the environment of the command instead (``OMP_WAIT_POLICY=PASSIVE cawbench ...``)."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if keep_cpu_memory:
        keep_freed_cpu_memory()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cawbench",
        description="Benchmark and ablation suite for forward-only (layer-local) training of CNNs.",
        epilog="Process settings (--threads, --no-keep-cpu-memory) go before the command. Set "
        "OMP_WAIT_POLICY=PASSIVE in the environment when other processes share the cores.",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        dest="process_threads",  # `study run --threads` is its own per-worker option
        help="torch intra-op threads (default: torch's, one per core)",
    )
    parser.add_argument(
        "--keep-cpu-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="glibc keeps freed memory for reuse, so big CPU tensors are not page-faulted in afresh every "
        "step (the process keeps its peak heap until it exits)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        module = sys.modules[__name__] if name == __name__ else _try_import(name)
        if module is not None:
            module.add_parser(sub)
    return parser


def _try_import(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            return None  # that part of the suite is not built yet
        raise


def user_errors() -> tuple[type[BaseException], ...]:
    from cawbench.engine import ResumeError, TrainingDiverged

    return (*USER_ERRORS, ResumeError, TrainingDiverged)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Expected errors (bad input, missing data, a diverged run, an unwritable folder) are
    one line on stderr and exit code 2; a closed pipe (``| head``) ends quietly; anything else is a bug:
    its traceback, a line asking to report it, exit code 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        configure_process(args.process_threads, args.keep_cpu_memory)
        return int(func(args) or 0)
    except BrokenPipeError:
        _silence_stdout()
        return 141  # as if killed by SIGPIPE, like other tools in a pipeline
    except KeyboardInterrupt:
        print("cawbench: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, user_errors()):
            print(f"cawbench: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(BUG_REPORT, file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file behind stdout
        pass


if __name__ == "__main__":
    sys.exit(main())
