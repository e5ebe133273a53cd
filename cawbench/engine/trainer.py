"""The training loop: one configuration from its config to its result row (:class:`Trainer`).

``Trainer(cfg)`` builds the data (kept on the training device), the method's network, one optimiser per
unit, the schedule clock and the executor; ``run()`` trains epoch after epoch (:meth:`Trainer.train_epoch`:
a :class:`~cawbench.engine.step.StepState` per batch, run by the executor), evaluates every readout fitted
on the validation split (:meth:`Trainer.evaluate`), writes metrics and a checkpoint after each epoch, stops
early under ``train.time_limit_s``, and appends the result row. On CUDA: bf16 autocast, channels_last and
cuDNN autotuning by default; ``train.compile`` compiles every unit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cawbench import run_folder
from cawbench.config import ConfigError, RunConfig, save_yaml
from cawbench.data import PreparedData, batch_bounds, iterate_batches, prepare_data
from cawbench.divergence import REFERENCE_KEY, check_epoch
from cawbench.engine.checkpoint import load_checkpoint, save_checkpoint
from cawbench.engine.devices import (
    autocast,
    fused_optimizer_devices,
    make_optimizer,
    resolve_device,
    use_bf16,
)
from cawbench.engine.executors import Executor, ExecutorSetup, build_executor, executor_name
from cawbench.engine.records import (
    accuracy_pct,
    epoch_means,
    percent,
    result_row,
    run_dir_for,
    save_artifacts,
    unit_stats,
)
from cawbench.engine.stats import StepStats
from cawbench.engine.step import BatchStep, StepState, UnitState
from cawbench.method import LocalNetwork, Method, StepContext, get_method, recipe_overrides
from cawbench.readouts import ReadoutContext, check_readouts, get_readout, per_layer_accuracy
from cawbench.results import append_result, atomic_write_text
from cawbench.schedule import ScheduleClock
from cawbench.seeding import seed_everything

EpochCallback = Callable[[dict[str, Any]], None]


class Trainer:
    """Trains one configuration; ``run()`` returns the result row (also appended to the results table)."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        data: PreparedData | None = None,
        callbacks: list[EpochCallback] | None = None,
        write_result: bool = True,
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.bf16 = use_bf16(cfg.train.precision, self.device)
        self.callbacks = list(callbacks or [])
        self.write_result = write_result
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.data = data if data is not None else prepare_data(cfg.data, self.device)
        self.method: Method = get_method(cfg.method)(cfg, self.data.info)
        self.net: LocalNetwork = self.method.build().to(self.device)
        self.channels_last = cfg.train.channels_last and self.device.type == "cuda"
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            # Static shapes per unit (the fastest kernels); room for every unit's shapes in train and eval.
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, 4 * len(self.net.units))
            for unit in self.net.units:
                unit.compile(dynamic=False)
        if self.device.type == "cuda" and not cfg.train.deterministic:
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
        self.executor_name = executor_name(cfg.train, self.device)  # refuses a CUDA graph off CUDA
        self.cuda_graph = cfg.train.cuda_graph
        self.units = [self._unit_state(u) for u in self.net.units]
        self.clock = self._schedule_clock()
        self.step = BatchStep(
            self.method,
            self.net,
            self.units,
            self.device,
            self.bf16,
            autocast_cache=not self.cuda_graph,
            lr_horizon=self.clock.lr_horizon,
            merge=cfg.train.merge_units,
        )
        self.executor_setup = ExecutorSetup(self.step, cfg.train, self._unit_costs)
        self.executor: Executor = build_executor(self.executor_name, self.executor_setup)
        self.scoring = [i for i, u in enumerate(self.net.units) if getattr(u, "emits_scores", True)]
        if not self.scoring:
            raise ConfigError(f"method {cfg.method!r} built a network with no scoring unit")
        check_readouts(cfg.readout, len(self.data.val), cfg.data.val_size)  # before any work
        self.run_dir = run_dir_for(cfg)
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.truncated = False

    def _unit_state(self, unit: nn.Module) -> UnitState:
        params = [p for p in unit.parameters() if p.requires_grad]
        ocfg = self.cfg.optim
        if getattr(unit, "optim_overrides", None):
            ocfg = dataclasses.replace(ocfg, **unit.optim_overrides)
        fused = self.cfg.train.fused_optimizer and self.device.type in fused_optimizer_devices()
        opt = make_optimizer(params, ocfg, fused=fused, capturable=self.cuda_graph) if params else None
        return UnitState(unit, params, opt, ocfg, ocfg.grad_clip)

    def _schedule_clock(self) -> ScheduleClock:
        """Per-epoch schedules, or (``train.budget_schedules``) progress mapped onto the reference horizon:
        ``train.schedule_epochs``, else the recipe's ``train.epochs``, else this run's."""
        train = self.cfg.train
        horizon = train.schedule_epochs or self.recipe_epochs() or train.epochs
        clock = ScheduleClock(train.epochs, self.steps_per_epoch(), float(horizon), train.budget_schedules)
        if not train.budget_schedules:
            return clock
        if self.cuda_graph:
            raise ConfigError(
                "train.budget_schedules moves the schedules every step, but train.cuda_graph freezes them in "
                "the captured step; set one of them to false"
            )
        scheduled = [
            f"learning rate ({s.optim.scheduler})" for s in self.units if s.optim.scheduler != "none"
        ]
        if not scheduled + self.method.epoch_schedules():
            raise ConfigError(
                f"train.budget_schedules=true would do nothing for method {self.cfg.method!r} here: it has no "
                "epoch-indexed schedule (optim.scheduler=none and none of its own); set it to false"
            )
        return clock

    def recipe_epochs(self) -> int | None:
        """``train.epochs`` of the recipe this run was resolved from (its schedules' horizon), if any."""
        if self.cfg.recipe == "default":
            return None
        try:
            return recipe_overrides(type(self.method), self.cfg.recipe, self.cfg.data.name).get(
                "train.epochs"
            )
        except ConfigError:
            return None

    def steps_per_epoch(self) -> int:
        return len(batch_bounds(len(self.data.train), self.cfg.train.batch_size, train=True))

    def schedule_point(self, epoch: int, step: int) -> StepContext:
        """Where one training batch stands on the schedules: position, loss weights, units that train."""
        at = self.clock.at(epoch, step)
        active = tuple(s.optimizer is not None and s.unit.trainable_at(at) for s in self.units)
        return StepContext(epoch, self.cfg.train.epochs, step, at, self.method.loss_weights(at), active)

    def step_state(self, epoch: int, step: int, stats: StepStats) -> StepState:
        """The state of one training batch: its schedule point and the epoch's statistics it adds to."""
        point = self.schedule_point(epoch, step)
        fields = {f.name: getattr(point, f.name) for f in dataclasses.fields(StepContext)}
        return StepState(**fields, stats=stats)

    def new_stats(self) -> StepStats:
        """Empty running sums for one epoch (each step's weighted terms too under budget schedules)."""
        return StepStats(len(self.units), self.device, weighted=self.clock.budget)

    def _unit_costs(self) -> list[float]:
        """Forward FLOPs of each unit on a 2-image batch (to balance pipeline workers)."""
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros(2, *self.data.info.input_shape, device=self.device)
        y = torch.zeros(2, dtype=torch.long, device=self.device)
        costs = []
        stance = getattr(torch.compiler, "set_stance", None)  # compiled units: count eagerly, compile later
        eager = stance("force_eager") if stance is not None else contextlib.nullcontext()
        with torch.no_grad(), eager:
            h, shortcut = self.net.stem(self.method.prepare_batch(x, y, True)), None
            for i, unit in enumerate(self.net.units):
                counter = FlopCounterMode(display=False)
                with counter:
                    out = unit(h)
                costs.append(float(counter.get_total_flops()) + 1.0)
                h, shortcut = self.net.advance(i, out.passed, shortcut)
        return costs

    # ----------------------------------------------------------------------------- training
    def _batches(self, split: str, epoch: int, train: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bs = self.cfg.train.batch_size if train else self.cfg.train.eval_batch_size
        part = getattr(self.data, split)
        for x, y in iterate_batches(
            part, bs, self.data.transform, self.device, train=train, seed=self.cfg.train.seed, epoch=epoch
        ):
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch of training through the executor; returns the epoch's training record."""
        cfg, net = self.cfg, self.net
        net.train()
        for u in net.units:
            u.on_epoch_start(epoch)
        stats = self.new_stats()
        first = self.step_state(epoch, 0, stats)  # the whole epoch's, unless budget-scaled

        def point(step: int) -> StepState:
            if self.clock.budget:
                return self.step_state(epoch, step, stats)
            return dataclasses.replace(first, step=step)

        bar = _progress(self.steps_per_epoch(), f"epoch {epoch + 1}/{cfg.train.epochs}", cfg.train.progress)
        start = time.perf_counter()
        self.executor.run_epoch(_counted(self._batches("train", epoch, train=True), bar), point)
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        self.method.on_epoch_end(net, epoch)
        means = epoch_means(stats, first.weights)
        references = check_epoch(
            means.means,
            means.firsts,
            self.history,
            epoch=epoch,
            epochs=cfg.train.epochs,
            num_classes=self.data.info.num_classes,
            lr_of=self._unit_lr,
            config_lr=cfg.optim.lr,
        )  # fmt: skip  (raises TrainingDiverged)
        summary = {
            **means.record,
            "schedule_at": self.clock.at(epoch, 0),
            "train_time_s": elapsed,
            "train_images_per_s": len(self.data.train) / elapsed if elapsed > 0 else None,
            "lr": self._current_lr(),
        }
        if references:
            summary[REFERENCE_KEY] = references
        return summary

    def _unit_lr(self, i: int) -> float | None:
        """Unit i's configured learning rate (before any schedule), for the divergence hint."""
        state = self.units[i] if i < len(self.units) else None
        return state.optim.lr if state is not None and state.optimizer is not None else None

    def _current_lr(self) -> float | None:
        for state in self.units:
            if state.optimizer is not None:
                return state.optimizer.param_groups[0]["lr"]
        return None

    # ----------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def collect_scores(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """All per-layer scores ``[L, N, K]`` (float32, on the device) and labels for a split."""
        self.net.eval()
        chunks, labels = [], []
        for x, y in self._batches(split, 0, train=False):
            with autocast(self.device, self.bf16):
                scores = self.method.eval_scores(self.net, x)
            chunks.append(torch.stack([s.float() for s in scores]))
            labels.append(y)
        if not chunks:
            k = self.data.info.num_classes
            return torch.zeros(len(self.scoring), 0, k, device=self.device), torch.zeros(0, dtype=torch.long)
        return torch.cat(chunks, dim=1), torch.cat(labels)

    def evaluate(self, epoch: int, train_summary: dict[str, Any], last: bool = False) -> dict[str, Any]:
        """Readouts fitted on validation; test scores every epoch, or at the last (``last``: a time limit
        ends the run here)."""
        start = time.perf_counter()
        val_scores, val_y = self.collect_scores("val")
        ce = train_summary["train_loss"].get("ce")
        train_ce = [float("nan") if ce is None or ce[i] is None else ce[i] for i in self.scoring]
        ctx = ReadoutContext(val_scores, val_y, train_ce, self.cfg.readout)
        names = list(dict.fromkeys((self.cfg.readout.name, *self.cfg.readout.extra)))
        states = {name: get_readout(name).fit(ctx) for name in names}
        record: dict[str, Any] = {
            "val_acc_layers": percent(per_layer_accuracy(val_scores, val_y)),
            "val_acc": {n: accuracy_pct(get_readout(n).combine(val_scores, states[n]), val_y) for n in names},
            "readout_state": states,
        }
        if self.cfg.train.eval_test_every_epoch or last or epoch == self.cfg.train.epochs - 1:
            test_scores, test_y = self.collect_scores("test")
            record["test_acc_layers"] = percent(per_layer_accuracy(test_scores, test_y))
            record["test_acc"] = {
                n: accuracy_pct(get_readout(n).combine(test_scores, states[n]), test_y) for n in names
            }
        record["eval_time_s"] = time.perf_counter() - start
        return record

    # ----------------------------------------------------------------------------- the run
    def run(self, resume: bool = False, overwrite: bool = True) -> dict[str, Any]:
        """Train (``resume``: from the run folder's checkpoint) and return the result row. A folder that holds
        another run is replaced whole when ``overwrite`` (the library default), else refused (the CLI's
        default). Resuming a finished run changes nothing and returns its stored row (``already_finished``)."""
        cfg = self.cfg
        ckpt_path = self.run_dir / "checkpoint.pt"
        run_folder.claim(self.run_dir, Path(cfg.out_dir), resume=resume, overwrite=overwrite)
        self.already_finished = False
        if resume:
            resumed = load_checkpoint(ckpt_path, cfg.config_hash(), self.device, self.net, self.units)
            self.history, self.start_epoch = resumed.history, resumed.epochs_done
            done = run_folder.finished_result(self.run_dir, cfg.config_hash())
            if done is not None and self.start_epoch >= cfg.train.epochs:
                self.already_finished = True
                if self.write_result:  # only if the run was killed between its result and its row
                    run_folder.ensure_row(Path(cfg.out_dir) / "results.jsonl", done)
                return done
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, self.run_dir / "config.yaml")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        wall_start = time.perf_counter() - sum(r.get("epoch_time_s", 0.0) for r in self.history)
        limit = cfg.train.time_limit_s
        session_start = time.perf_counter()
        self.truncated = False
        for epoch in range(self.start_epoch, cfg.train.epochs):
            epoch_start = time.perf_counter()
            summary = self.train_epoch(epoch)
            if limit is not None and epoch < cfg.train.epochs - 1:
                # Stop after this epoch if the next one (as long as this one) would overrun the limit.
                spent = time.perf_counter() - session_start
                self.truncated = spent + (time.perf_counter() - epoch_start) > limit
            record = {"epoch": epoch, **summary, **self.evaluate(epoch, summary, last=self.truncated)}
            record["unit_stats"] = unit_stats(self.net)
            record["epoch_time_s"] = time.perf_counter() - epoch_start
            self.history.append(record)
            atomic_write_text(
                self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history)
            )
            if cfg.train.checkpoint:
                save_checkpoint(ckpt_path, cfg.config_hash(), epoch + 1, self.net, self.units, self.history)
            for callback in self.callbacks:
                callback(record)
            if self.truncated:
                break
        wall = time.perf_counter() - wall_start
        result = result_row(
            cfg, self.history, self.data, self.net, self.device, self.bf16, self.run_dir, wall
        )
        save_artifacts(self.net, self.run_dir)
        atomic_write_text(self.run_dir / "result.json", json.dumps(result, indent=2))
        if self.write_result:
            append_result(Path(cfg.out_dir) / "results.jsonl", result)
        return result


def _counted(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], bar: Any
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in batches:
        yield batch
        bar.update(1)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="batch", dynamic_ncols=True, disable=None)


def train(cfg: RunConfig, resume: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Convenience: build a :class:`Trainer` and run it."""
    return Trainer(cfg, **kwargs).run(resume=resume)
