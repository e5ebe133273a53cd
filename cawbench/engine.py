"""The training engine: loops, devices, precision, evaluation, selection, checkpoints, results.

Per mini-batch every unit runs forward on its detached input, its weighted local loss is backpropagated
inside the unit only, its optimiser steps, and its output (computed before the update) feeds the next
unit. Loss terms and accuracies accumulate on the device and are read once per epoch, so there is no
host synchronisation inside the layer loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import cawbench
from cawbench.config import ConfigError, OptimConfig, RunConfig, save_yaml
from cawbench.data import PreparedData, iterate_batches, prepare_data
from cawbench.method import LocalNetwork, Method, StepContext, get_method
from cawbench.readouts import ReadoutContext, get_readout, per_layer_accuracy
from cawbench.results import append_result, atomic_write_bytes, atomic_write_text
from cawbench.seeding import seed_everything

EpochCallback = Callable[[dict[str, Any]], None]


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the message names the epoch, layer and term."""


class ResumeError(RuntimeError):
    """The checkpoint cannot be resumed with this configuration."""


# --------------------------------------------------------------------------------- devices, precision
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use auto or cpu")
    return device


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "bf16":
        return True
    return precision == "auto" and device.type == "cuda"


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# --------------------------------------------------------------------------------- optimisers
def make_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, epochs: int) -> Any:
    """Stepped once per epoch."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=cfg.lr_min)
    if cfg.scheduler == "linear_cooldown":  # loeweX's FF: linear decay to 0 over the second half
        half = epochs / 2
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: 1.0 if e < half else max(0.0, 2 * (epochs - e) / epochs)
        )
    return None


@dataclasses.dataclass
class UnitState:
    unit: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    clip: float | None


# --------------------------------------------------------------------------------- the trainer
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
            for unit in self.net.units:
                unit.compile()
        self.units = [self._unit_state(u) for u in self.net.units]
        self.scoring = [i for i, u in enumerate(self.net.units) if getattr(u, "emits_scores", True)]
        if not self.scoring:
            raise ConfigError(f"method {cfg.method!r} built a network with no scoring unit")
        for name in (cfg.readout.name, *cfg.readout.extra):
            get_readout(name)  # unknown readout names fail before any work
        self.run_dir = Path(cfg.out_dir) / "runs" / (cfg.run_name or default_run_name(cfg))
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0

    def _unit_state(self, unit: nn.Module) -> UnitState:
        params = [p for p in unit.parameters() if p.requires_grad]
        ocfg = self.cfg.optim
        if getattr(unit, "optim_overrides", None):
            ocfg = dataclasses.replace(ocfg, **unit.optim_overrides)
        opt = make_optimizer(params, ocfg) if params else None
        sched = make_scheduler(opt, ocfg, self.cfg.train.epochs) if opt is not None else None
        return UnitState(unit, params, opt, sched, ocfg.grad_clip)

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
        cfg, net = self.cfg, self.net
        net.train()
        for u in net.units:
            u.on_epoch_start(epoch)
        weights = self.method.loss_weights(epoch)
        active = [u.optimizer is not None and u.unit.trainable_at(epoch) for u in self.units]
        n_units = len(self.units)
        term_sums: list[dict[str, torch.Tensor]] = [{} for _ in range(n_units)]
        correct = torch.zeros(n_units, device=self.device)
        seen = torch.zeros(n_units, device=self.device)
        steps = 0
        n_batches = math.ceil(len(self.data.train) / cfg.train.batch_size)
        bar = _progress(n_batches, f"epoch {epoch + 1}/{cfg.train.epochs}", cfg.train.progress)
        start = time.perf_counter()
        for step, (x, y) in enumerate(self._batches("train", epoch, train=True)):
            ctx = StepContext(epoch, cfg.train.epochs, step)
            with autocast(self.device, self.bf16):
                h = net.stem(self.method.prepare_batch(x, y, True))
            shortcut = None
            for i, state in enumerate(self.units):
                with autocast(self.device, self.bf16):
                    out = state.unit(h)
                    terms = state.unit.local_losses(out, y, ctx) if active[i] else {}
                if terms:
                    loss = sum(weights.get(k, 1.0) * v.float() for k, v in terms.items())
                    state.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if state.clip is not None:
                        torch.nn.utils.clip_grad_norm_(state.params, state.clip)
                    state.optimizer.step()
                    for k, v in terms.items():
                        acc = term_sums[i].get(k)
                        term_sums[i][k] = v.detach().float() if acc is None else acc + v.detach().float()
                if out.scores is not None:
                    labels = y[: out.scores.shape[0]]
                    correct[i] += (out.scores.detach().argmax(1) == labels).sum()
                    seen[i] += labels.shape[0]
                h, shortcut = net.advance(i, out.passed, shortcut)
            steps += 1
            bar.update(1)
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        self.method.on_epoch_end(net, epoch)
        for state in self.units:
            if state.scheduler is not None:
                state.scheduler.step()
        return self._train_summary(epoch, term_sums, correct, seen, steps, elapsed, active)

    def _train_summary(self, epoch, term_sums, correct, seen, steps, elapsed, active) -> dict[str, Any]:
        names = sorted({k for sums in term_sums for k in sums})
        # One device->host transfer for every term of every unit.
        table = torch.full((len(term_sums), max(len(names), 1)), float("nan"), device=self.device)
        for i, sums in enumerate(term_sums):
            for j, k in enumerate(names):
                if k in sums:
                    table[i, j] = sums[k] / max(steps, 1)
        values = table.tolist()
        acc = (100 * correct / seen.clamp(min=1)).tolist()
        seen_list = seen.tolist()
        for i, row in enumerate(values):
            for j, v in enumerate(row[: len(names)]):
                if active[i] and names[j] in term_sums[i] and not math.isfinite(v):
                    raise TrainingDiverged(f"loss term {names[j]!r} of layer {i} is {v} at epoch {epoch}")
        return {
            "train_loss": {
                k: [_nan_to_none(values[i][j]) for i in range(len(values))] for j, k in enumerate(names)
            },
            "train_acc": [acc[i] if seen_list[i] else None for i in range(len(acc))],
            "train_time_s": elapsed,
            "train_images_per_s": len(self.data.train) / elapsed if elapsed > 0 else None,
            "lr": self._current_lr(),
        }

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

    def evaluate(self, epoch: int, train_summary: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        val_scores, val_y = self.collect_scores("val")
        ce = train_summary["train_loss"].get("ce")
        train_ce = [float("nan") if ce is None or ce[i] is None else ce[i] for i in self.scoring]
        ctx = ReadoutContext(val_scores, val_y, train_ce, self.cfg.readout)
        names = list(dict.fromkeys((self.cfg.readout.name, *self.cfg.readout.extra)))
        states = {name: get_readout(name).fit(ctx) for name in names}
        record: dict[str, Any] = {
            "val_acc_layers": _pct(per_layer_accuracy(val_scores, val_y)),
            "val_acc": {n: _acc(get_readout(n).combine(val_scores, states[n]), val_y) for n in names},
            "readout_state": states,
        }
        if self.cfg.train.eval_test_every_epoch or epoch == self.cfg.train.epochs - 1:
            test_scores, test_y = self.collect_scores("test")
            record["test_acc_layers"] = _pct(per_layer_accuracy(test_scores, test_y))
            record["test_acc"] = {
                n: _acc(get_readout(n).combine(test_scores, states[n]), test_y) for n in names
            }
        record["eval_time_s"] = time.perf_counter() - start
        return record

    # ----------------------------------------------------------------------------- the run
    def run(self, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        ckpt_path = self.run_dir / "checkpoint.pt"
        if resume:
            self._load_checkpoint(ckpt_path)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, self.run_dir / "config.yaml")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        wall_start = time.perf_counter() - sum(r.get("epoch_time_s", 0.0) for r in self.history)
        for epoch in range(self.start_epoch, cfg.train.epochs):
            epoch_start = time.perf_counter()
            summary = self.train_epoch(epoch)
            record = {"epoch": epoch, **summary, **self.evaluate(epoch, summary)}
            record["unit_stats"] = _unit_stats(self.net)
            record["epoch_time_s"] = time.perf_counter() - epoch_start
            self.history.append(record)
            atomic_write_text(
                self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history)
            )
            if cfg.train.checkpoint:
                self._save_checkpoint(ckpt_path, epoch + 1)
            for callback in self.callbacks:
                callback(record)
        result = self._result_row(time.perf_counter() - wall_start)
        self._save_artifacts()
        atomic_write_text(self.run_dir / "result.json", json.dumps(result, indent=2))
        if self.write_result:
            append_result(Path(cfg.out_dir) / "results.jsonl", result)
        return result

    def _result_row(self, wall: float) -> dict[str, Any]:
        cfg, hist = self.cfg, self.history
        main = cfg.readout.name
        final = hist[-1]
        vals = [r["val_acc"][main] for r in hist]
        best = int(np.nanargmax(vals)) if not all(math.isnan(v) for v in vals) else len(hist) - 1
        tests = [r.get("test_acc", {}).get(main, float("nan")) for r in hist]
        max_test = int(np.nanargmax(tests)) if not all(math.isnan(t) for t in tests) else len(hist) - 1
        plan_depth = cfg.model.depth
        return {
            "method": cfg.method,
            "variant": cfg.variant,
            "recipe": cfg.recipe,
            "dataset": cfg.data.name,
            "arch": cfg.model.arch,
            "depth": plan_depth,
            "width": cfg.model.width,
            "seed": cfg.train.seed,
            "config_hash": cfg.config_hash(),
            "readout": main,
            "epochs": len(hist),
            "n_train": len(self.data.train),
            "n_val": len(self.data.val),
            "n_test": len(self.data.test),
            "final_val_acc": final["val_acc"][main],
            "final_test_acc": final.get("test_acc", {}).get(main),
            "best_val_epoch": best,
            "best_val_acc": vals[best],
            "test_acc_at_best_val": tests[best],
            "max_test_acc": tests[max_test],
            "max_test_epoch": max_test,
            "final_test_acc_by_readout": final.get("test_acc", {}),
            "per_layer_test_acc": final.get("test_acc_layers"),
            "per_layer_val_acc": final["val_acc_layers"],
            "wall_time_s": wall,
            "train_images_per_s": float(np.median([r["train_images_per_s"] or 0 for r in hist])),
            "peak_cuda_mem_bytes": torch.cuda.max_memory_allocated(self.device)
            if self.device.type == "cuda"
            else None,
            "n_params": sum(p.numel() for p in self.net.parameters()),
            "device": _device_name(self.device),
            "precision": "bf16" if self.bf16 else "fp32",
            "versions": _versions(),
            "run_dir": str(self.run_dir),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    # ----------------------------------------------------------------------------- persistence
    def _save_checkpoint(self, path: Path, epochs_done: int) -> None:
        state = {
            "config_hash": self.cfg.config_hash(),
            "epochs_done": epochs_done,
            "net": self.net.state_dict(),
            "optimizers": [s.optimizer.state_dict() if s.optimizer else None for s in self.units],
            "schedulers": [s.scheduler.state_dict() if s.scheduler else None for s in self.units],
            "history": self.history,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        import io

        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def _load_checkpoint(self, path: Path) -> None:
        if not path.is_file():
            raise ResumeError(f"--resume: no checkpoint at {path}; run without --resume to start this run")
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:  # a truncated or foreign file
            raise ResumeError(f"--resume: cannot read checkpoint {path}: {exc}") from None
        if state.get("config_hash") != self.cfg.config_hash():
            raise ResumeError(
                f"--resume: checkpoint {path} was made with config hash {state.get('config_hash')}, but this "
                f"configuration hashes to {self.cfg.config_hash()} (compare {path.parent / 'config.yaml'}); "
                "resume with the same configuration or choose another --run-name"
            )
        self.net.load_state_dict(state["net"])
        for s, o, sc in zip(self.units, state["optimizers"], state["schedulers"], strict=True):
            if s.optimizer is not None and o is not None:
                s.optimizer.load_state_dict(o)
            if s.scheduler is not None and sc is not None:
                s.scheduler.load_state_dict(sc)
        self.history = list(state["history"])
        self.start_epoch = int(state["epochs_done"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([t.cpu() for t in state["rng_cuda"]])

    def _save_artifacts(self) -> None:
        arrays = {}
        for i, unit in enumerate(self.net.units):
            for name, tensor in unit.artifacts().items():
                arrays[f"layer{i:02d}_{name}"] = tensor.detach().float().cpu().numpy()
        if arrays:
            import io

            buffer = io.BytesIO()
            np.savez_compressed(buffer, **arrays)
            atomic_write_bytes(self.run_dir / "artifacts.npz", buffer.getvalue())


def _unit_stats(net: LocalNetwork) -> dict[str, list[float | None]]:
    per_unit = [u.epoch_stats() for u in net.units]
    names = sorted({k for s in per_unit for k in s})
    return {k: [s.get(k) for s in per_unit] for k in names}


def _acc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return 100.0 * (scores.argmax(-1) == labels).float().mean().item()


def _pct(values: list[float]) -> list[float]:
    return [100.0 * v for v in values]


def _nan_to_none(v: float) -> float | None:
    return None if isinstance(v, float) and math.isnan(v) else v


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


def default_run_name(cfg: RunConfig) -> str:
    width = f"{cfg.model.width:g}"
    return f"{cfg.method}-{cfg.data.name}-{cfg.model.arch}-w{width}-s{cfg.train.seed}-{cfg.config_hash()[:8]}"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _versions() -> dict[str, str]:
    out = {"cawbench": cawbench.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
        if sha:
            out["git"] = sha
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def train(cfg: RunConfig, resume: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Convenience: build a :class:`Trainer` and run it."""
    return Trainer(cfg, **kwargs).run(resume=resume)
