"""Training and evaluation images/s of FF and SymBa beside their backprop twins, and FF's inference cost.

Run from the repository root (Fashion-MNIST must be installed; see README.md):

    .venv/bin/python scripts/ff_symba_cpu_speed.py --train 1000 --test 1000 --repeats 3 \
        > reports/ff_symba_cpu_speed/result.json

Every configuration is the method's ``paper`` recipe for Fashion-MNIST (FF 4 x 2000, SymBa 3 x 2000, each
BP twin the same MLP trained end to end), restricted to a training/test subset. Configurations are timed
in turn, ``--repeats`` times, and the median is printed, so that slow phases of a shared machine hit all
of them alike; ratios from the same run are more trustworthy than the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from cawbench.engine import Trainer
from cawbench.method import resolve_config


def make_trainer(method: str, recipe: str, args: argparse.Namespace, out_dir: str, **overrides) -> Trainer:
    cfg = resolve_config(
        {
            "method": method, "recipe": recipe, "data.name": "fashion-mnist", "data.subset": args.train,
            "data.test_subset": args.test, "data.val_subset": 10, "train.device": "cpu",
            "train.progress": False, "train.checkpoint": False, "train.epochs": 1, "out_dir": out_dir,
            **overrides,
        }
    )  # fmt: skip
    return Trainer(cfg, write_result=False)


def images_per_s(n: int, work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return n / (time.perf_counter() - start)


def sweep_only(tr: Trainer) -> None:
    """Hinton's K-pass inference alone (the label sweep), over the test subset."""
    tr.net.eval()
    for x, _ in tr._batches("test", 0, train=False):
        tr.method.label_sweep(tr.net, x.flatten(1))


def one_pass_only(tr: Trainer) -> None:
    tr.net.eval()
    for x, _ in tr._batches("test", 0, train=False):
        tr.method.one_pass_scores(tr.net, x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000, help="training images per timed epoch")
    parser.add_argument("--test", type=int, default=1000, help="test images per timed evaluation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp(prefix="ffsymba-speed-")
    trainers = {
        "ff (4x2000)": make_trainer("ff", "paper", args, out),
        "bp twin of ff": make_trainer("backprop", "paper-ff", args, out),
        "symba (3x2000)": make_trainer("symba", "paper", args, out),
        "bp twin of symba": make_trainer("backprop", "paper-symba", args, out),
        "ff hard negatives": make_trainer("ff", "paper", args, out, **{"params.negatives": "hard"}),
    }
    head = make_trainer(
        "ff",
        "paper",
        args,
        out,
        **{"params.softmax_head": True, "readout.name": "last", "readout.sum_range": [1, -2]},
    )
    samples: dict[str, list[float]] = {}

    def record(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    for _ in range(args.repeats):
        for name, tr in trainers.items():
            record(f"{name}: train img/s", images_per_s(args.train, lambda tr=tr: tr.train_epoch(0)))
            if "hard" not in name:
                record(
                    f"{name}: eval img/s", images_per_s(args.test, lambda tr=tr: tr.collect_scores("test"))
                )
        record("ff: K-pass label sweep img/s", images_per_s(args.test, lambda: sweep_only(head)))
        record("ff: one-pass head img/s", images_per_s(args.test, lambda: one_pass_only(head)))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    medians["ff: K-pass / one-pass time ratio"] = (
        medians["ff: one-pass head img/s"] / medians["ff: K-pass label sweep img/s"]
    )
    for pair in (("ff (4x2000)", "bp twin of ff"), ("symba (3x2000)", "bp twin of symba")):
        for kind in ("train", "eval"):
            medians[f"{pair[0]} / bp twin {kind} time ratio"] = (
                medians[f"{pair[1]}: {kind} img/s"] / medians[f"{pair[0]}: {kind} img/s"]
            )
    print(json.dumps({"args": vars(args), "torch": torch.__version__, "medians": medians}, indent=2))


if __name__ == "__main__":
    main()
