"""Time every CPU conv plan (forward layout x weight-gradient kernel) on one network's conv shapes.

The measurements behind cawbench.cpu_conv.plan_for: for each distinct conv shape of the network (batch
--batch), one training pass (forward, then the weight gradient, as a layer-local unit does) under each plan,
the plans interleaved round by round so load changes hit all alike; median ms per shape. The last columns
say which plan was fastest and which one plan_for picks.
usage: python scripts/conv_layouts.py --method caw_conv --width 1.0 [--out reports/bench/cpu-conv-layouts.md]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cawbench_inplace  # noqa: E402

cawbench_inplace.setup()

from ab_engine import write_markdown  # noqa: E402

from cawbench.bench import random_data  # noqa: E402
from cawbench.cpu_conv import (  # noqa: E402
    PLAIN,
    WINOGRAD2,
    WINOGRAD4,
    ConvPlan,
    _TunedConvFunction,
    plan_for,
)
from cawbench.engine import Trainer, keep_freed_cpu_memory  # noqa: E402
from cawbench.method import resolve_config  # noqa: E402

TITLE = """# CPU conv plans timed per shape (scripts/conv_layouts.py)

Each block is one run of the command it names: for every distinct conv shape of the network, one forward and
weight gradient (as a layer-local unit trains; dy = ones) under each plan (forward layout / weight-gradient
kernel; `winogradm` is Winograd F(m x m, 3x3), cawbench/winograd.py), the plans interleaved round by round;
median ms (– where a plan cannot compute the shape: Winograd F(m x m) takes 3x3 stride-1 convs on maps whose
sides are multiples of m). `plan_for` is the fixed rule `cawbench.cpu_conv` applies in training
(`train.cpu_conv=tuned`, the CPU default). Blocks from 2026-11-28 on also give each plan's float32 error."""
DIRECT = [ConvPlan(f, w) for f, w in itertools.product(("nchw", "nhwc"), ("native", "nhwc", "transposed"))]
PLANS = [*DIRECT, WINOGRAD2, WINOGRAD4]
ACCURACY_PLANS = [PLAIN, WINOGRAD2, WINOGRAD4]  # float32 error against float64, per shape


def conv_shapes(method: str, width: float, batch: int, size: int) -> list[tuple[torch.nn.Conv2d, tuple, int]]:
    """(conv, input shape, how many convs have it) for each distinct conv shape of the method's network,
    found by one forward."""
    cfg = resolve_config({"method": method, "model.width": width, "train.device": "cpu",
                          "train.progress": False, "train.checkpoint": False, "train.cpu_conv": "plain"})  # fmt: skip
    data = random_data((1, size, size), 10, batch, batch, torch.device("cpu"))
    trainer = Trainer(cfg, data=data, write_result=False)
    seen: dict[tuple, list] = {}

    def record(conv, inputs, _out) -> None:  # noqa: ANN001
        key = (
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            tuple(inputs[0].shape[-2:]),
        )
        seen.setdefault(key, [conv, (batch, *inputs[0].shape[1:]), 0])[2] += 1

    hooks = [m.register_forward_hook(record) for m in trainer.net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        trainer.net.eval()
        trainer.net.layer_scores(torch.randn(batch, 1, size, size))
    for hook in hooks:
        hook.remove()
    return [tuple(v) for v in seen.values()]


def time_plan(conv: torch.nn.Conv2d, x: torch.Tensor, plan: ConvPlan) -> float:
    weight = conv.weight.detach().requires_grad_(True)
    start = time.perf_counter()
    y = _TunedConvFunction.apply(x, weight, None, conv, plan)
    y.backward(torch.ones_like(y))
    return (time.perf_counter() - start) * 1e3


def plan_errors(conv: torch.nn.Conv2d, x: torch.Tensor) -> dict[ConvPlan, tuple[float, float]]:
    """(forward, weight-gradient) float32 error of each of ACCURACY_PLANS against float64 sums, as the largest
    absolute difference over the largest absolute entry; a random dy."""
    args = (conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups)
    w64 = conv.weight.detach().double()
    y64 = torch.nn.functional.conv2d(x.double(), w64, None, conv.stride, conv.padding)
    dy = torch.randn(y64.shape)
    dw64 = torch.ops.aten.convolution_backward(
        dy.double(), x.double(), w64, None, *args, [False, True, False]
    )[1]
    errors = {}
    for plan in ACCURACY_PLANS:
        if not plan.usable_for(conv, x.shape[-2:]):
            continue
        weight = conv.weight.detach().requires_grad_(True)
        y = _TunedConvFunction.apply(x, weight, None, conv, plan)
        (dw,) = torch.autograd.grad(y, weight, dy)
        errors[plan] = tuple(
            ((got.double() - ref).abs().max() / ref.abs().max()).item() for got, ref in ((y, y64), (dw, dw64))
        )
    return errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="caw_conv")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--input", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", help="append the table (with command, date, hardware) to this markdown file")
    args = p.parse_args()
    keep_freed_cpu_memory()  # as the engine does: no page faults on big temporaries
    rows = []
    for conv, shape, count in conv_shapes(args.method, args.width, args.batch, args.input):
        x = torch.randn(shape)
        plans = [plan for plan in PLANS if plan.usable_for(conv, shape[-2:])]
        times: dict[ConvPlan, list[float]] = {plan: [] for plan in plans}
        for plan in plans:
            time_plan(conv, x, plan)  # warm-up
        for _ in range(args.rounds):
            for plan in plans:
                times[plan].append(time_plan(conv, x, plan))
        median = {plan: statistics.median(t) for plan, t in times.items()}
        chosen = plan_for(conv, shape[-2:])
        best = min(median, key=median.get)
        name = (
            f"{conv.in_channels}->{conv.out_channels} k{conv.kernel_size[0]} s{conv.stride[0]} @{shape[-1]}"
        )
        rows.append((name, count, median, best, chosen, plan_errors(conv, x)))
        print(name, {f"{k.forward}/{k.weight_grad}": round(v, 1) for k, v in median.items()}, flush=True)
    lines = [
        "| conv (in->out, kernel, stride, @input) | in net | "
        + " | ".join(f"{k.forward}/{k.weight_grad}" for k in PLANS)
        + " | fastest | plan_for | plan_for / plain |",
        "|---" * (len(PLANS) + 5) + "|",
    ]
    total_plain = total_chosen = 0.0
    for name, count, median, best, chosen, _ in rows:
        plain, picked = median[PLAIN], median[chosen]
        total_plain, total_chosen = total_plain + count * plain, total_chosen + count * picked
        cells = " | ".join(f"{median[k]:.1f}" if k in median else "–" for k in PLANS)
        lines.append(
            f"| {name} | {count} | {cells} | {best.forward}/{best.weight_grad} | {chosen.forward}/{chosen.weight_grad}"
            f" | {picked / plain:.2f} |"
        )
    lines.append(
        f"\nOne training step's convs (each shape times its count): plain {total_plain:.0f} ms, "
        f"plan_for {total_chosen:.0f} ms ({total_chosen / total_plain:.2f}x)."
    )
    lines += [
        "\nFloat32 error against float64 sums (largest absolute difference / largest absolute entry; random x"
        " and dy), forward / weight gradient:\n",
        "| conv | " + " | ".join(f"{k.forward}/{k.weight_grad}" for k in ACCURACY_PLANS) + " |",
        "|---" * (len(ACCURACY_PLANS) + 1) + "|",
    ]
    for name, *_, errors in rows:
        cells = " | ".join(
            f"{errors[k][0]:.1e} / {errors[k][1]:.1e}" if k in errors else "–" for k in ACCURACY_PLANS
        )
        lines.append(f"| {name} | {cells} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_markdown(
            Path(args.out),
            [
                f"{args.method} width {args.width}, batch {args.batch}, 1x{args.input}x"
                f"{args.input}, {args.rounds} interleaved rounds",
                "",
                table,
            ],
            TITLE,
            fenced=False,
        )


if __name__ == "__main__":
    main()
