"""``cawbench bench``: what each method costs, beside the backprop reference of the same network.

Every figure is measured through the engine's own code path (:class:`cawbench.engine.Trainer` and its
:class:`~cawbench.engine.BatchStep`) on random uint8 images of the requested shape kept on the device, so
data batching and the on-device transform are included, as in training. Definitions:

- **train img/s**: images per second of ``Trainer.train_epoch`` over ``--steps`` batches (forward, local
  backward, clipping, optimiser steps, batching); ``--warmup`` untimed epochs first, then ``--repeats``
  timed ones: the median, and the spread (max - min) / median in percent.
- **eval img/s**: ``Trainer.collect_scores`` (the method's ``eval_scores``: every layer's class scores).
- **saved for backward**: bytes of the distinct tensor storages autograd keeps for backward during one
  training step, counted exactly with ``torch.autograd.graph.saved_tensors_hooks`` around each unit's
  forward and loss; parameter storages are left out (they exist whether or not anything is saved).
  ``max`` is the largest single unit's: what a sequential layer-local step holds at once, since each unit's
  graph is freed by its own backward before the next unit runs. ``sum`` adds all units: what would be held
  if every unit's graph were alive together. Backprop is one unit, so its max equals its sum.
- **peak CUDA memory**: ``torch.cuda.max_memory_allocated`` over the timed training epochs (parameters,
  optimiser state and the resident data included); "above resident" subtracts what was allocated before.
- **ops/step**: ATen operations dispatched in one training step (the forward, every unit's local backward,
  clipping, optimiser steps, the loss-term and accuracy sums; views and in-place ops included), counted with
  a ``TorchDispatchMode`` on any device: on a GPU each is about one kernel launch, so it measures how
  launch-bound a method is even where no GPU is at hand. Split into the ops inside each unit (its forward,
  losses, backward and, unmerged, its update) and the ops outside any unit (the stem, the merged updates of
  ``train.merge_units``). ``--ops-only`` measures nothing else; ``--unfused-layers`` counts (and times) the
  channel-wise layers' ReLU-dropout-pooling as the plain composition the GPU runs, not the CPU's fused node,
  with the native dropout kernel a GPU runs (one op), not the CPU's bulk-drawn masks. The step counted is a
  steady-state one: the second of an epoch, after one untallied step into the same running sums (an
  epoch's first step also records each term's first value, bookkeeping the later steps do not have); the
  backprop reference is counted the same way.
- **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` over one training step (the forward and backward
  matmul/convolution work it counts; only the gradients a unit really computes: a detached input gets no
  input gradient), per image; likewise over one evaluation batch. Counted eagerly even when units are
  compiled. **GFLOP/s** = training FLOPs per image x train img/s.
- **ratios** (``x BP``): the method's figure over that of the backprop reference with the same
  architecture, width, depth, input, classes and batch, measured in the same run. With ``--recipe R`` the
  reference is backprop's twin recipe ``R-<method>`` where it has one (``paper-cwcomp``, ``paper-cafo``,
  ``paper-ff``, ``paper-symba``: the twin's head and normalisation), else its recipe ``R``.

Methods are picked with ``--methods`` (default: every registered one), each with its own architecture and
settings (its defaults, or ``--recipe paper`` for ``--dataset``) unless ``--arch``/``--width`` are given.
An entry may carry overrides for that row only: ``caw_conv{train.cuda_graph=true;params.dropout=0}``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gc
import io
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cawbench.config import ConfigError, DataConfig, parse_override
from cawbench.data import BatchTransform, DataInfo, PreparedData, Split


# --------------------------------------------------------------------------------- measuring helpers
class SavedTensorMeter:
    """Exact bytes autograd saves for backward, per unit: distinct storages, parameters excluded."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.per_unit: dict[int, dict[int, int]] = {}

    def hook(self, unit: int) -> contextlib.AbstractContextManager:
        seen = self.per_unit.setdefault(unit, {})

        def pack(t: torch.Tensor) -> torch.Tensor:
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # a tensor without storage of its own
                return t
            ptr = storage.data_ptr()
            if ptr not in self.exclude and storage.nbytes() > 0:
                seen[ptr] = storage.nbytes()
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def unit_bytes(self) -> list[int]:
        return [sum(self.per_unit[i].values()) for i in sorted(self.per_unit)]


class HostReadCounter(TorchDispatchMode):
    """Counts operations that need a tensor's value on the host (``.item()``, ``bool(t)``, ``nonzero``,
    ...): each one is a device synchronisation on a GPU, so a training step should have none. Not counted:
    reads of host tensors by code that only ever reads host tensors: ``torch.optim`` (the step counters the
    non-fused optimisers keep on the host on purpose) and :func:`cawbench.layers.bulk_uniform` (the seed of a
    CPU-only dropout draw)."""

    OPS = {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.nonzero.default,
        torch.ops.aten.masked_select.default,
        torch.ops.aten.equal.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten._unique2.default,
        torch.ops.aten.unique_consecutive.default,
    }

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func in self.OPS and not _host_only_read(args):
            self.count += 1
            self.names.add(str(func))
        return func(*args, **(kwargs or {}))


#: (file path fragment, function name or None for any) of code that only ever reads host tensors
HOST_ONLY_CODE = (
    (f"{os.sep}torch{os.sep}optim{os.sep}", None),
    (f"{os.sep}cawbench{os.sep}layers.py", "bulk_uniform"),
)


def _host_only_read(args: tuple) -> bool:
    if not all(a.device.type == "cpu" for a in args if isinstance(a, torch.Tensor)):
        return False
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return False
        code = frame.f_code
        if any(part in code.co_filename and name in (None, code.co_name) for part, name in HOST_ONLY_CODE):
            return True
        frame = frame.f_back
    return False


class OpCounter(TorchDispatchMode):
    """Counts every ATen operation dispatched while active; ``hook(i)`` (a BatchStep unit hook) books the
    operations run inside unit ``i`` to that unit, the rest to ``shared``."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.per_unit: dict[int, int] = {}
        self.by_op: dict[str, int] = {}
        self._unit: int | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.total += 1
        if self._unit is not None:
            self.per_unit[self._unit] = self.per_unit.get(self._unit, 0) + 1
        name = str(func)
        self.by_op[name] = self.by_op.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def hook(self, unit: int) -> Iterator[None]:
        outer, self._unit = self._unit, unit
        try:
            yield
        finally:
            self._unit = outer

    @property
    def shared(self) -> int:
        return self.total - sum(self.per_unit.values())

    def unit_counts(self, n_units: int) -> list[int]:
        return [self.per_unit.get(i, 0) for i in range(n_units)]


def count_step_ops(trainer: Any, x: torch.Tensor, y: torch.Tensor) -> OpCounter:
    """The ops of one steady-state training step through ``trainer.step`` (the engine's own step, eager):
    the second step of epoch 0, after a first one, not counted, into the same fresh running sums (an epoch's
    first step also records every loss term's first value, which later steps do not)."""
    counter = OpCounter()
    stats = trainer.new_stats()
    with _force_eager():
        trainer.step(x, y, trainer.step_state(0, 0, stats))
        with counter:
            trainer.step(x, y, trainer.step_state(0, 1, stats), hook=counter.hook)
    return counter


def unfuse_layers(net: torch.nn.Module) -> int:
    """The op structure of the GPU path on any device (``--unfused-layers``): layers with a fused CPU
    training path (:class:`cawbench.layers.ReluDropoutPool`: ReLU, dropout and pooling in one autograd node)
    run as their plain composition, and every dropout (:class:`cawbench.layers.BulkDropout`: the channel-wise
    layers' and backprop's) runs the native kernel a GPU runs (``torch.native_dropout``) instead of the
    CPU's bulk draws; returns how many fused layers were switched."""
    from cawbench.layers import BulkDropout, ReluDropoutPool

    layers = [m for m in net.modules() if isinstance(m, ReluDropoutPool)]
    for layer in layers:
        layer.fused = False
    for dropout in (m for m in net.modules() if isinstance(m, BulkDropout)):
        dropout.bulk = False
    return len(layers)


def parameter_storages(module: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def random_data(
    shape: tuple[int, int, int],
    classes: int,
    n_train: int,
    n_eval: int,
    device: torch.device,
    name: str = "random",
) -> PreparedData:
    """Random uint8 images and labels, resident on ``device`` like a real small dataset. ``name``: the
    dataset the methods are told it is (some pick per-dataset settings by name)."""
    c, h, w = shape
    if h != w:
        raise ConfigError(f"--input {c}x{h}x{w}: images must be square (H == W)")
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        x = torch.randint(0, 256, (n, c, h, w), generator=gen, dtype=torch.uint8)
        y = torch.randint(0, classes, (n,), generator=gen)
        return Split(x.to(device), y.to(device))

    transform = BatchTransform((0.5,) * c, (0.25,) * c, None, DataConfig(name="synthetic"))
    info = DataInfo(name, classes, c, h)
    train, test = split(n_train), split(n_eval)
    # Validation images too (drawn last: train and test stay as they were): a run whose readout is fitted on
    # validation refuses to start without any, although the bench never fits readouts.
    val = split(n_eval)
    return PreparedData(info, train, val, test, transform, "random uint8 (bench)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _force_eager() -> contextlib.AbstractContextManager:
    """Run compiled units eagerly (FlopCounterMode cannot see inside compiled kernels)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


def summarise(values: list[float]) -> tuple[float, float]:
    """(median, spread in percent = (max - min) / median)."""
    med = statistics.median(values)
    return med, (100.0 * (max(values) - min(values)) / med if med else float("nan"))


# --------------------------------------------------------------------------------- one method
@dataclasses.dataclass(frozen=True)
class Entry:
    label: str  # as written on the command line
    method: str
    overrides: dict[str, Any]


def parse_methods(text: str, available: list[str]) -> list[Entry]:
    """``"a,b{k=v;k2=v2}"`` -> entries; ``all`` = every registered method."""
    entries: list[Entry] = []
    for part in re.findall(r"[^,{]+(?:\{[^}]*\})?", text):
        part = part.strip()
        if not part:
            continue
        if part == "all":
            entries += [Entry(m, m, {}) for m in available]
            continue
        match = re.fullmatch(r"([^{}]+)(?:\{([^}]*)\})?", part)
        if match is None:
            raise ConfigError(f"--methods entry {part!r} is not NAME or NAME{{key=value;...}}")
        name = match.group(1).strip()
        if name not in available:
            raise ConfigError(f"--methods: unknown method {name!r}; valid methods: {', '.join(available)}")
        pairs = [p for p in (match.group(2) or "").split(";") if p.strip()]
        entries.append(Entry(part, name, dict(parse_override(p) for p in pairs)))
    if not entries:
        raise ConfigError(f"--methods {text!r} names no method; valid methods: {', '.join(available)}")
    return entries


def has_recipe(method: str, recipe: str, dataset: str) -> bool:
    from cawbench.method import get_method, recipe_overrides

    try:
        recipe_overrides(get_method(method), recipe, dataset)
    except ConfigError:
        return False
    return True


def twin_recipe(method: str, args: argparse.Namespace) -> str:
    """The backprop recipe a row is compared with: the twin ``<recipe>-<method>`` where backprop has one
    (same network, head and normalisation as the method's recipe), else ``<recipe>``, else the default."""
    from cawbench.method import reference_method

    if args.recipe == "default":
        return "default"
    reference = reference_method()
    for name in (f"{args.recipe}-{method}", args.recipe):
        if has_recipe(reference, name, args.dataset):
            return name
    return "default"


def bench_config(
    entry: Entry, args: argparse.Namespace, model: dict[str, Any] | None = None, recipe: str | None = None
):
    """The run config of one row: the method's defaults (or recipe: ``--recipe`` unless ``recipe`` is
    given), the bench's sizes, then overrides."""
    from cawbench.method import get_method, params_fields, resolve_config

    cls = get_method(entry.method)
    layer: dict[str, Any] = {"method": entry.method, "data.name": args.dataset}
    recipe = args.recipe if recipe is None else recipe
    if recipe != "default" and has_recipe(entry.method, recipe, args.dataset):
        layer["recipe"] = recipe  # else the method's defaults (the row says which recipe it used)
    layer.update(
        {
            "train.batch_size": args.batch,
            "train.eval_batch_size": args.eval_batch or args.batch,
            "train.device": args.device,
            "train.progress": False,
            "train.checkpoint": False,
        }
    )
    if args.arch:
        layer["model.arch"] = args.arch
    if args.width:
        layer["model.width"] = args.width
    fields = set(params_fields(cls))
    for key, value in (parse_override(o) for o in args.set):
        if not key.startswith("params.") or key.split(".", 1)[1] in fields:
            layer[key] = value
    layer.update(entry.overrides)
    if model is not None:  # the reference: exactly the benched method's network
        layer.update({f"model.{k}": v for k, v in model.items()})
    return resolve_config(layer)


def measure(cfg, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """Every figure for one configuration (see the module docstring for definitions)."""
    from cawbench.engine import Trainer, resolve_device

    device = resolve_device(cfg.train.device)
    data = random_data(args.input_shape, args.classes, args.batch * args.steps,
                       cfg.train.eval_batch_size * args.eval_steps, device, cfg.data.name)  # fmt: skip
    trainer = Trainer(cfg, data=data, write_result=False)
    if getattr(args, "unfused_layers", False):
        unfuse_layers(trainer.net)
    row: dict[str, Any] = {
        "label": label,
        "method": cfg.method,
        "recipe": cfg.recipe,
        "arch": cfg.model.arch,
        "width": cfg.model.width,
        "depth": cfg.model.depth,
        "batch": cfg.train.batch_size,
        "units": len(trainer.units),
        "params_m": sum(p.numel() for p in trainer.net.parameters()) / 1e6,
        "precision": "bf16" if trainer.bf16 else "fp32",
    }
    if args.ops_only:
        trainer.train_epoch(0)  # optimiser state and running sums exist from here on, as in training
        _count_ops(row, trainer)
        row["device"] = describe_device(device)
        return row
    # Training speed: whole engine epochs of --steps batches.
    for _ in range(args.warmup):
        trainer.train_epoch(0)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    times = [trainer.train_epoch(0)["train_time_s"] for _ in range(args.repeats)]
    n_train = len(data.train)
    row["train_ips"], row["train_ips_spread_pct"] = summarise([n_train / t for t in times])
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row["peak_mem_mb"] = peak / 2**20
        row["peak_above_resident_mb"] = (peak - resident) / 2**20
    # Evaluation speed.
    for _ in range(args.warmup):
        trainer.collect_scores("test")
    eval_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        trainer.collect_scores("test")
        _sync(device)
        eval_times.append(time.perf_counter() - start)
    row["eval_ips"], row["eval_ips_spread_pct"] = summarise([len(data.test) / t for t in eval_times])
    # One more training step each for the saved-bytes count and the FLOP count.
    trainer.net.train()
    batches = trainer._batches("train", 0, train=True)
    x, y = next(batches)
    meter = SavedTensorMeter(parameter_storages(trainer.net))
    trainer.step(x, y, trainer.step_state(0, 0, trainer.new_stats()), hook=meter.hook)
    per_unit = meter.unit_bytes()
    row["saved_max_mb"] = max(per_unit, default=0) / 2**20
    row["saved_sum_mb"] = sum(per_unit) / 2**20
    reads = HostReadCounter()
    with reads:
        trainer.step(x, y, trainer.step_state(0, 0, trainer.new_stats()))
    row["host_reads_per_step"] = reads.count
    _count_ops(row, trainer, (x, y))
    from torch.utils.flop_counter import FlopCounterMode

    with _force_eager():
        counter = FlopCounterMode(display=False)
        with counter:
            trainer.step(x, y, trainer.step_state(0, 0, trainer.new_stats()))
        row["train_gflop_per_img"] = counter.get_total_flops() / x.shape[0] / 1e9
        xe, _ = next(trainer._batches("test", 0, train=False))
        trainer.net.eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            trainer.method.eval_scores(trainer.net, xe)
        row["eval_gflop_per_img"] = counter.get_total_flops() / xe.shape[0] / 1e9
    row["train_gflops"] = row["train_gflop_per_img"] * row["train_ips"]
    row["device"] = describe_device(device)
    del trainer, data
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _count_ops(row: dict[str, Any], trainer: Any, batch: tuple | None = None) -> None:
    """ops/step, the mean per unit, the ops outside any unit, and each unit's count."""
    if batch is None:
        trainer.net.train()
        x, y = next(trainer._batches("train", 0, train=True))
        batch = (x, y)
    counter = count_step_ops(trainer, *batch)
    units = counter.unit_counts(len(trainer.units))
    row["ops_per_step"] = counter.total
    row["ops_per_unit"] = sum(units) / max(len(units), 1)
    row["ops_shared"] = counter.shared
    row["ops_by_unit"] = " ".join(map(str, units))


# --------------------------------------------------------------------------------- ratios and output
RATIO_FIELDS = {  # figure -> ratio column
    "train_ips": "train_ips_x",
    "eval_ips": "eval_ips_x",
    "saved_max_mb": "saved_max_x",
    "saved_sum_mb": "saved_sum_x",
    "peak_mem_mb": "peak_mem_x",
    "train_gflop_per_img": "train_flop_x",
    "train_gflops": "gflops_x",
    "ops_per_step": "ops_x",
}


def add_ratios(rows: list[dict[str, Any]], refs: dict[tuple, dict[str, Any]]) -> None:
    for row in rows:
        ref = refs.get(row.get("ref_key"))
        for figure, column in RATIO_FIELDS.items():
            a = row.get(figure)
            b = ref.get(figure) if ref else None
            numbers = isinstance(a, int | float) and isinstance(b, int | float)
            row[column] = a / b if numbers and b else None


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 10 ** (1 - digits) or v == 0 else f"{v:.2g}"
    return str(v)


def _x(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}x"


Column = tuple[str, Callable[[dict[str, Any]], str]]
ROW_COLUMNS: list[Column] = [
    ("method", lambda r: r["label"]),
    ("arch", lambda r: f"{r.get('arch', '')} w{_fmt(r.get('width'), 2)}"),
    ("params M", lambda r: _fmt(r.get("params_m"), 2)),
]
OPS_COLUMNS: list[Column] = [
    ("ops/step", lambda r: _fmt(r.get("ops_per_step"))),
    ("x BP", lambda r: _x(r.get("ops_x"))),
    ("ops/unit", lambda r: _fmt(r.get("ops_per_unit"))),
    ("ops shared", lambda r: _fmt(r.get("ops_shared"))),
]
COLUMNS: list[Column] = [
    *ROW_COLUMNS,
    ("train img/s", lambda r: f"{_fmt(r.get('train_ips'))} ±{_fmt(r.get('train_ips_spread_pct'), 0)}%"),
    ("x BP", lambda r: _x(r.get("train_ips_x"))),
    ("eval img/s", lambda r: f"{_fmt(r.get('eval_ips'))} ±{_fmt(r.get('eval_ips_spread_pct'), 0)}%"),
    ("x BP", lambda r: _x(r.get("eval_ips_x"))),
    ("saved MB max/sum", lambda r: f"{_fmt(r.get('saved_max_mb'))}/{_fmt(r.get('saved_sum_mb'))}"),
    ("x BP (max)", lambda r: _x(r.get("saved_max_x"))),
    ("peak MB", lambda r: _fmt(r.get("peak_mem_mb"), 0)),
    ("x BP", lambda r: _x(r.get("peak_mem_x"))),
    ("train GFLOP/img", lambda r: _fmt(r.get("train_gflop_per_img"), 3)),
    ("x BP", lambda r: _x(r.get("train_flop_x"))),
    ("GFLOP/s", lambda r: _fmt(r.get("train_gflops"))),
    ("x BP", lambda r: _x(r.get("gflops_x"))),
    ("host reads/step", lambda r: _fmt(r.get("host_reads_per_step"))),
    *OPS_COLUMNS,
]


BASELINE_COLUMNS: list[Column] = [
    ("ops/step before", lambda r: _fmt(r.get("baseline_ops_per_step"))),
    ("x BP before", lambda r: _x(r.get("baseline_ops_x"))),
]


def table_lines(
    rows: list[dict[str, Any]], markdown: bool, ops_only: bool = False, baseline: bool = False
) -> list[str]:
    columns = [*ROW_COLUMNS, *OPS_COLUMNS] if ops_only else list(COLUMNS)
    if baseline:
        columns += BASELINE_COLUMNS
    cells = [[name for name, _ in columns]]
    for row in rows:
        if row.get("error"):
            cells.append([row["label"], f"error: {row['error']}"] + [""] * (len(columns) - 2))
        else:
            cells.append([fmt(row) for _, fmt in columns])
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join("---" for _ in columns) + "|")
        return lines
    widths = [max(len(c[i]) for c in cells if i < len(c)) for i in range(len(columns))]
    return ["  ".join(c[i].ljust(widths[i]) for i in range(len(c))).rstrip() for c in cells]


CSV_FIELDS = [
    "label", "method", "recipe", "arch", "width", "depth", "batch", "units", "params_m", "precision",
    "train_ips", "train_ips_spread_pct", "eval_ips", "eval_ips_spread_pct", "saved_max_mb", "saved_sum_mb",
    "peak_mem_mb", "peak_above_resident_mb", "train_gflop_per_img", "eval_gflop_per_img", "train_gflops",
    "host_reads_per_step", "ops_per_step", "ops_per_unit", "ops_shared", "ops_by_unit",
    *RATIO_FIELDS.values(), "baseline_ops_per_step", "baseline_ops_x", "reference", "device", "error",
]  # fmt: skip


def write_reports(rows: list[dict[str, Any]], args: argparse.Namespace, device: torch.device) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Appended, not with_suffix: a name like "cpu-w1.0" keeps its ".0".
    stem = args.name or device_slug(device)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in CSV_FIELDS})
    (out / f"{stem}.csv").write_text(buffer.getvalue())
    (out / f"{stem}.md").write_text(render_markdown(rows, args, device))
    return out / f"{stem}.md"


def render_markdown(rows: list[dict[str, Any]], args: argparse.Namespace, device: torch.device) -> str:
    from cawbench.engine import software_versions

    versions = software_versions()
    cudnn = torch.backends.cudnn.version() if device.type == "cuda" else None
    lines = [
        f"# Cost of each method on {describe_device(device)}",
        "",
        f"- command: `{' '.join(['cawbench', *process_args(args), 'bench', *args.argv])}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        f"- hardware: {describe_device(device)}",
        f"- versions: cawbench {versions.get('cawbench')} (git {versions.get('git', '?')}), torch "
        f"{torch.__version__}"
        + (f", CUDA {torch.version.cuda}, cuDNN {cudnn}" if device.type == "cuda" else "")
        + f", Python {platform.python_version()}",
        f"- input {'x'.join(map(str, args.input_shape))}, {args.classes} classes, batch {args.batch}, "
        + (
            "ops counted over one steady-state training step (an epoch's second: its first, not counted, "
            "records first values) after one untimed epoch (`--ops-only`: nothing timed)"
            if args.ops_only
            else f"{args.steps} batches per timed epoch, {args.warmup} warm-up + {args.repeats} timed "
            "repeats (median ± (max-min)/median)"
        ),
    ]
    if args.baseline:
        lines.append(
            f"- `before` columns: ops/step and its ratio from `{args.baseline}` (an earlier run of this "
            f"command; its command, commit and date are in `{Path(args.baseline).with_suffix('.md')}`), "
            "matched by method, architecture and width"
        )
    if args.note:
        lines.append(f"- note: {args.note}")
    table = table_lines(rows, markdown=True, ops_only=args.ops_only, baseline=bool(args.baseline))
    lines += ["", *table, ""]
    lines += [
        "Ops/step = ATen operations dispatched in one training step (a `TorchDispatchMode` counter; views, "
        "in-place and optimiser ops included; on a GPU each is about one kernel launch); ops/unit = the mean "
        "over units of the ops inside each unit (forward, losses, backward and, when units update one by "
        "one, their update); ops shared = the ops outside any unit (the stem and the merged updates of "
        "`train.merge_units`). Backprop references: the twin recipe `<recipe>-<method>` where backprop has "
        "one.",
        "",
    ]
    if args.ops_only:
        return "\n".join(lines)
    lines += [
        "Definitions (see `cawbench/bench.py`): `x BP` = the method's figure over the backprop reference's "
        "with the same network, input and batch, measured in this run. Saved MB = bytes autograd keeps for "
        "backward in one training step (distinct storages, parameters excluded), `max` = largest unit (held "
        "at once by a sequential layer-local step), `sum` = all units. Peak MB = max CUDA memory allocated "
        "over the timed training epochs (parameters, optimiser state, resident data included). FLOPs from "
        "`torch.utils.flop_counter.FlopCounterMode` over one training step (forward + the backward work "
        "really done), per image; GFLOP/s = that x train img/s. Host reads/step = operations in one training "
        "step that need a value on the host (`.item()`, `bool(t)`, `nonzero`, ...): device syncs on a GPU.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- command line
def parse_input(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    try:
        c, h, w = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--input {text!r} must look like CxHxW, e.g. 1x32x32 or 3x32x32") from None
    if min(c, h, w) < 1:
        raise ConfigError(f"--input {text!r}: every size must be >= 1")
    return c, h, w


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="images/s, saved-for-backward bytes, memory and FLOPs of each method vs backprop",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--methods", default="all", help="comma list; NAME{key=value;...} adds row overrides")
    p.add_argument("--arch", help="architecture for every method (default: each method's own)")
    p.add_argument("--width", type=float, help="width multiplier for every method (default: each method's)")
    p.add_argument("--batch", type=int, default=128, help="training batch size")
    p.add_argument("--eval-batch", type=int, help="evaluation batch size (default: --batch)")
    p.add_argument("--input", default="1x32x32", help="image shape CxHxW")
    p.add_argument("--classes", type=int, default=10, help="number of classes")
    p.add_argument("--steps", type=int, default=3, help="training batches per timed epoch")
    p.add_argument("--eval-steps", type=int, default=2, help="evaluation batches per timed pass")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median and spread)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats first")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--recipe", default="default", help="default | paper: each method's recipe settings")
    p.add_argument("--dataset", default="fashion-mnist", help="dataset whose recipe --recipe picks")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every row (params.* only where the method has it)")  # fmt: skip
    p.add_argument("--no-reference", action="store_true", help="skip the backprop reference rows")
    p.add_argument("--out", default="reports/bench", help="folder for <name>.md and <name>.csv")
    p.add_argument("--name", help="report file name without suffix (default: the device, e.g. cpu)")
    p.add_argument(
        "--ops-only",
        action="store_true",
        help="count the ATen ops of one training step per row, measure nothing else",
    )
    p.add_argument(
        "--baseline",
        metavar="CSV",
        help="an earlier bench CSV: its ops/step are shown beside this run's (before/after)",
    )
    p.add_argument(
        "--unfused-layers",
        action="store_true",
        help="run layers with a fused CPU training path (the channel-wise ReLU-dropout-pooling node) as their "
        "plain composition and dropout as the native kernel (not bulk CPU draws): the op structure of the "
        "GPU path",
    )
    p.add_argument("--note", help="a line written into the report (e.g. about shared cores)")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from cawbench.engine import resolve_device
    from cawbench.method import list_methods, reference_method

    args.argv = _command_args(args)
    args.input_shape = parse_input(args.input)
    for name in ("batch", "steps", "eval_steps", "repeats", "classes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    entries = parse_methods(args.methods, list_methods())
    # Plain backprop rows first: they are the references of the rows after them.
    reference = reference_method()  # backprop
    entries.sort(key=lambda e: not (e.method == reference and not e.overrides))
    device = resolve_device(args.device)
    print(f"bench on {describe_device(device)}: {', '.join(e.label for e in entries)}", flush=True)
    baseline = load_baseline(Path(args.baseline)) if args.baseline else None
    rows: list[dict[str, Any]] = []
    refs: dict[tuple, dict[str, Any]] = {}
    for entry in entries:
        rows.append(_measure_entry(entry, args))
        model_key = rows[-1].get("model_key")
        if entry.method == reference and not entry.overrides:
            own = args.recipe if has_recipe(reference, args.recipe, args.dataset) else "default"
            rows[-1]["ref_key"] = (model_key, own)
            refs.setdefault(rows[-1]["ref_key"], rows[-1])
        elif model_key is not None:
            recipe = twin_recipe(entry.method, args)
            key = rows[-1]["ref_key"] = (model_key, recipe)
            if not args.no_reference and key not in refs:
                label = f"{reference} (ref)" if recipe == args.recipe else f"{reference} (ref, {recipe})"
                ref = _measure_entry(Entry(label, reference, {}), args, rows[-1]["model"], recipe)
                ref["ref_key"] = key
                refs[key] = ref
                rows.append(ref)
        path = _finish(rows, refs, args, device, baseline)  # after every row: a cut-off run leaves a report
    print("\n".join(table_lines(rows, markdown=False, ops_only=args.ops_only, baseline=baseline is not None)))
    print(f"wrote {path} and {path.parent / (path.name[: -len('.md')] + '.csv')}")
    return 0


def _finish(
    rows: list[dict[str, Any]], refs: dict[tuple, dict[str, Any]], args, device, baseline=None
) -> Path:
    for row in rows:
        ref = refs.get(row.get("ref_key"))
        row["reference"] = ref["label"] if ref else None
    add_ratios(rows, refs)
    if baseline is not None:
        add_baseline(rows, baseline)
    return write_reports(rows, args, device)


def load_baseline(path: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    """Rows of an earlier bench CSV (``--baseline``), by (label, arch, width)."""
    if not path.is_file():
        raise ConfigError(
            f"--baseline {path}: no such file (give a CSV written by an earlier cawbench bench)"
        )
    rows = list(iter_rows(path))
    if rows and "ops_per_step" not in rows[0]:
        raise ConfigError(f"--baseline {path} has no ops_per_step column: it predates the op counts")
    return {(r["label"], r["arch"], _width_key(r["width"])): r for r in rows}


def _width_key(width: Any) -> str:
    try:
        return f"{float(width):g}"
    except (TypeError, ValueError):
        return str(width)


def add_baseline(rows: list[dict[str, Any]], baseline: dict[tuple[str, str, str], dict[str, str]]) -> None:
    """The baseline's ops/step and its ratio beside each row with the same label, architecture and width."""
    for row in rows:
        old = baseline.get((row["label"], str(row.get("arch")), _width_key(row.get("width"))), {})
        for field in ("ops_per_step", "ops_x"):
            value = old.get(field)
            number = float(value) if value not in (None, "") else None
            row[f"baseline_{field}"] = int(number) if field == "ops_per_step" and number else number


def _measure_entry(
    entry: Entry, args: argparse.Namespace, model: dict[str, Any] | None = None, recipe: str | None = None
) -> dict:
    from cawbench.engine import TrainingDiverged

    cfg = bench_config(entry, args, model, recipe)
    model_dict = dataclasses.asdict(cfg.model)
    key = tuple(sorted((k, str(v)) for k, v in model_dict.items()))
    print(f"  {entry.label}: {cfg.model.arch} width {cfg.model.width:g} ...", flush=True)
    try:
        row = measure(cfg, args, entry.label)
    except (TrainingDiverged, RuntimeError, ConfigError) as exc:  # keep benching the other methods
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        row = {"label": entry.label, "method": entry.method, "arch": cfg.model.arch,
               "width": cfg.model.width, "error": first[:200]}  # fmt: skip
        print(f"    failed: {first[:200]}", flush=True)
    row["model"], row["model_key"] = model_dict, key
    return row


def _command_args(args: argparse.Namespace) -> list[str]:
    """The command as parsed, every option spelled out (so the report can be rerun as written)."""
    out = []
    for flag in ("methods", "arch", "width", "batch", "eval_batch", "input", "classes", "steps",
                 "eval_steps", "repeats", "warmup", "device", "recipe", "dataset", "out", "name",
                 "baseline"):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            text = str(value)
            out.append(f"--{flag.replace('_', '-')} {shlex.quote(text)}")
    out += [f"--set {shlex.quote(s)}" for s in args.set]
    if args.no_reference:
        out.append("--no-reference")
    if args.ops_only:
        out.append("--ops-only")
    if getattr(args, "unfused_layers", False):
        out.append("--unfused-layers")
    return out


def process_args(args: argparse.Namespace) -> list[str]:
    """The process options of the command (``cawbench --threads N --no-keep-cpu-memory bench ...``)."""
    threads = getattr(args, "process_threads", None)
    out = [f"--threads {threads}"] if threads is not None else []
    return out + ([] if getattr(args, "keep_cpu_memory", True) else ["--no-keep-cpu-memory"])


def iter_rows(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a bench CSV (for reports and tests)."""
    with path.open() as fh:
        yield from csv.DictReader(fh)
