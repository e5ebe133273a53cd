"""Training and evaluation images/s of CaFo and CwComp beside their backprop twins, in one process.

Each configuration is a method's recipe for Fashion-MNIST (28x28, full width) on a subset; the configurations
take turns inside every repeat so that load changes on a shared machine hit all of them alike. Training
images/s is the engine's own figure for one epoch (every unit's forward, local loss, backward and step);
evaluation images/s times the per-layer scoring of the test subset (``Trainer.collect_scores``). CaFo's
authors' full-batch GD fit happens after the epoch and is timed separately (seconds per GD step).

    .venv/bin/python scripts/cafo_cwcomp_cpu_speed.py --train 1500 --test 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from cawbench.engine import Trainer
from cawbench.method import resolve_config
from cawbench.methods import cafo

CONFIGS = {
    "cafo (minibatch Adam heads)": ("cafo", "minibatch"),
    "bp twin of cafo": ("backprop", "paper-cafo"),
    "cwcomp (paper, all 4 layers in their window)": ("cwcomp", "paper"),
    "bp twin of cwcomp": ("backprop", "paper-cwcomp"),
}


def make_trainer(method: str, recipe: str, args: argparse.Namespace) -> Trainer:
    cfg = resolve_config({
        "method": method, "recipe": recipe, "data.name": "fashion-mnist", "data.subset": args.train,
        "data.test_subset": args.test, "data.val_subset": 100, "train.epochs": args.repeats,
        "train.device": "cpu", "train.progress": False, "train.checkpoint": False, "out_dir": "/tmp/speed",
    })  # fmt: skip
    return Trainer(cfg, write_result=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gd-steps", type=int, default=20)
    parser.add_argument("--out", default="reports/cafo_cwcomp_cpu_speed/result.json", help="result file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trainers = {name: make_trainer(m, r, args) for name, (m, r) in CONFIGS.items()}
    runs: dict[str, list[float]] = {}
    for epoch in range(args.repeats):
        for name, trainer in trainers.items():
            summary = trainer.train_epoch(epoch)
            runs.setdefault(f"{name}: train img/s", []).append(summary["train_images_per_s"])
            start = time.perf_counter()
            trainer.collect_scores("test")
            runs.setdefault(f"{name}: eval img/s", []).append(args.test / (time.perf_counter() - start))
            print(
                name,
                epoch,
                round(runs[f"{name}: train img/s"][-1], 1),
                round(runs[f"{name}: eval img/s"][-1], 1),
            )
    medians = {k: statistics.median(v) for k, v in runs.items()}
    for method, twin in (("cafo (minibatch Adam heads)", "bp twin of cafo"),
                         ("cwcomp (paper, all 4 layers in their window)", "bp twin of cwcomp")):  # fmt: skip
        for kind in ("train", "eval"):
            medians[f"{method} / twin {kind} time ratio"] = (
                medians[f"{twin}: {kind} img/s"] / medians[f"{method}: {kind} img/s"]
            )
    # The authors' CaFo predictor fit: full-batch GD on all training features of each block.
    heads = [u for u in trainers["cafo (minibatch Adam heads)"].net.units if isinstance(u, cafo.CaFoHead)]
    n = args.train
    gd = 0.0
    for head in heads:
        features = torch.randn(n, head.span[1] - head.span[0])
        onehot = torch.nn.functional.one_hot(torch.randint(0, 10, (n,)), 10).float()
        start = time.perf_counter()
        cafo.full_batch_gd(features, onehot, "ce", args.gd_steps, 0.01)
        gd += (time.perf_counter() - start) / args.gd_steps
    medians["cafo full-batch GD: s per step, all 3 heads, per 1000 images"] = gd * 1000 / n
    medians["cafo full-batch GD: 5000 steps on 50k images, s (extrapolated)"] = gd * 5000 * 50_000 / n
    out = {"args": vars(args), "torch": torch.__version__, "runs": runs, "medians": medians}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(medians, indent=2))


if __name__ == "__main__":
    main()
