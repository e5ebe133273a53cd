"""One GPU check of CaFo and CwComp on full Fashion-MNIST with their recipes, beside their BP twins.

Writes one JSON line per finished run (and per CwComp epoch) to ``$OUT/gpu_check.jsonl``:

    python3 scripts/cafo_cwcomp_gpu_check.py --data-dir DIR --out OUT [--tiny]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cawbench.engine import Trainer
from cawbench.method import resolve_config

RUNS = [
    # name, method, recipe, extra overrides
    ("cafo paper (Rand-CE, full-batch GD 5000 steps)", "cafo", "paper", {}),
    ("cafo paper-mse (closed form)", "cafo", "paper-mse", {}),
    ("bp twin of cafo, 1 epoch (speed)", "backprop", "paper-cafo", {"train.epochs": 1}),
    ("bp twin of cwcomp, 1 epoch (speed)", "backprop", "paper-cwcomp", {"train.epochs": 1}),
    ("cwcomp paper (50 epochs, ILT acc)", "cwcomp", "paper", {}),
]
TINY = {"data.subset": 500, "data.val_subset": 100, "data.test_subset": 200, "train.epochs": 2,
        "params.gd_steps": 5, "model.width": 0.25}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run of this script")
    args = parser.parse_args()
    log = Path(args.out) / "gpu_check.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)

    def write(row: dict) -> None:
        with log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    for name, method, recipe, extra in RUNS:
        layer = {"method": method, "recipe": recipe, "data.name": "fashion-mnist", "data.data_dir": args.data_dir,
                 "train.progress": False, "train.checkpoint": False, "out_dir": "/tmp/gpu_check", **extra}  # fmt: skip
        if args.tiny:
            layer.update({k: v for k, v in TINY.items() if method == "cafo" or not k.startswith("params.")})
            layer["train.device"] = "cpu"
        cfg = resolve_config(layer)

        def per_epoch(record: dict, name: str = name) -> None:
            keep = ("epoch", "val_acc", "test_acc", "test_acc_layers", "train_images_per_s", "eval_time_s")
            write({"run": name, **{k: record.get(k) for k in keep}})

        start = time.perf_counter()
        trainer = Trainer(cfg, write_result=False, callbacks=[per_epoch] if method == "cwcomp" else [])
        result = trainer.run()
        keep = ("method", "recipe", "readout", "epochs", "n_train", "n_val", "n_test", "final_test_acc",
                "final_test_acc_by_readout", "test_acc_at_best_val", "max_test_acc", "per_layer_test_acc",
                "train_images_per_s", "wall_time_s", "device", "precision", "peak_cuda_mem_bytes")  # fmt: skip
        evals = [r["eval_time_s"] for r in trainer.history]
        n_eval = result["n_val"] + result["n_test"]
        write({"run": name, **{k: result[k] for k in keep}, "eval_images_per_s": n_eval / min(evals),
               "total_s": time.perf_counter() - start})  # fmt: skip


if __name__ == "__main__":
    main()
