"""Do the engine's modes compute the same training? Eager vs CUDA graph, sequential vs pipeline, merged
updates (``train.merge_units=steps``) vs each unit updating on its own (``none``).

Trains each registered method (or those given) (dropout set to 0 where the method has a ``dropout`` parameter, so no random
draws differ) for two short epochs on random data in each mode, from the same seed and data order, and
reports the largest parameter difference to the sequential eager run (default ``train.merge_units=all``).
Deterministic kernels are asked for, so a difference means the engine changed the maths, not that cuDNN
picked another algorithm. ``merged_steps_vs_unmerged`` compares ``merge_units=steps`` with ``none`` (equal
maths, bit for bit on the CPU; on CUDA each unit's total gradient norm comes from a foreach norm kernel,
not clip_grad_norm_'s vector_norm, so rounding may differ); ``all`` is not compared with them: its batched loss pieces round
differently, and under Adam CAW-Conv's exactly uniform initial assignment turns any rounding difference
into lr-sized first steps (see tests/test_merge.py).
usage: python scripts/engine_equivalence.py --device cuda [--methods a,b] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cawbench_inplace  # noqa: E402

cawbench_inplace.setup()

import torch  # noqa: E402

from cawbench.bench import random_data  # noqa: E402
from cawbench.engine import Trainer, build_executor, with_replayed_graphs  # noqa: E402
from cawbench.method import get_method, list_methods, resolve_config  # noqa: E402


def train_params(
    method: str, device: str, mode: dict, epochs: int = 2, replay: str | None = None, images: int = 485
) -> torch.Tensor:
    """Parameters after ``epochs`` short epochs; ``replay``: run the CUDA-graph runner ("steps") or the
    captured pipeline ("pipeline") with the CPU replay stand-in for graphs (their data flow, anywhere)."""
    cls = get_method(method)
    layer = {"method": method, "train.device": device, "train.progress": False, "train.checkpoint": False,
             "train.batch_size": 16, "train.deterministic": True, "train.seed": 3, **cls.smoke_overrides,
             **mode}  # fmt: skip
    if "dropout" in {f.name for f in dataclasses.fields(cls.Config)}:
        layer["params.dropout"] = 0.0
    cfg = resolve_config(layer)
    # default 30 full batches of 16 and one of 5: enough for a 17-unit pipeline to reach its captured
    # steady state in both epochs
    data = random_data((1, 16, 16), 10, images, 32, torch.device(device), "fashion-mnist")
    trainer = Trainer(cfg, data=data, write_result=False)
    if replay is not None:  # "steps": the CUDA-graph executor; "pipeline": the captured pipeline
        name = "cuda_graph" if replay == "steps" else "pipeline"
        trainer.executor = build_executor(name, with_replayed_graphs(trainer.executor_setup))
    for epoch in range(epochs):
        trainer.train_epoch(epoch)
    return torch.cat([p.detach().float().flatten().cpu() for p in trainer.net.parameters()])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--methods", default="all")
    p.add_argument("--json")
    p.add_argument("--images", type=int, default=485, help="training images (485: 30 batches of 16 and 5)")
    args = p.parse_args()
    methods = list_methods() if args.methods == "all" else args.methods.split(",")
    modes = {
        "pipeline": ({"train.parallel": "pipeline"}, None),
        "streams": ({"train.parallel": "streams"}, None),
    }
    if args.device == "cpu":
        modes["replayed_graph"] = ({}, "steps")
        modes["replayed_pipeline_graph"] = ({"train.parallel": "pipeline"}, "pipeline")
    if args.device.startswith("cuda"):
        modes["cuda_graph"] = ({"train.cuda_graph": True}, None)
        modes["pipeline_graph"] = ({"train.parallel": "pipeline", "train.cuda_graph": True}, None)
        modes["streams_graph"] = ({"train.parallel": "streams", "train.cuda_graph": True}, None)
    report: dict[str, dict[str, object]] = {}
    for method in methods:
        report[method] = {}
        try:
            base = train_params(method, args.device, {}, images=args.images)
        except Exception as exc:  # report and go on with the next method
            report[method]["error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(method, report[method], flush=True)
            continue
        scale = base.abs().max().item() or 1.0
        for name, (mode, replay) in modes.items():
            try:
                other = train_params(method, args.device, mode, replay=replay, images=args.images)
                diff = (other - base).abs().max().item()
                report[method][name] = {"max_abs_diff": diff, "relative": diff / scale, "equal": diff == 0.0}
            except Exception as exc:
                report[method][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        try:
            alone = train_params(method, args.device, {"train.merge_units": "none"}, images=args.images)
            merged = train_params(method, args.device, {"train.merge_units": "steps"}, images=args.images)
            diff = (merged - alone).abs().max().item()
            report[method]["merged_steps_vs_unmerged"] = {
                "max_abs_diff": diff, "relative": diff / (alone.abs().max().item() or 1.0), "equal": diff == 0.0
            }  # fmt: skip
        except Exception as exc:
            report[method]["merged_steps_vs_unmerged"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(method, json.dumps(report[method]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
