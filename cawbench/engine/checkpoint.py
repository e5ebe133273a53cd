"""Checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

A checkpoint holds the configuration's hash (``--resume`` refuses another configuration), the epochs done,
the network's state, every unit's optimiser state, the per-epoch history and the random generators' states.
Learning rates are not stored: they are a function of the schedule position and are set again at the next
step. ``tests/test_engine.py`` checks that a resumed run ends like an uninterrupted one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cawbench.engine.step import UnitState
from cawbench.method import LocalNetwork
from cawbench.results import atomic_write_bytes


class ResumeError(RuntimeError):
    """The checkpoint cannot be resumed with this configuration."""


@dataclass
class Resumed:
    """What a loaded checkpoint hands back to the trainer (the network and optimisers are restored in place)."""

    history: list[dict[str, Any]]
    epochs_done: int


def save_checkpoint(
    path: Path,
    config_hash: str,
    epochs_done: int,
    net: LocalNetwork,
    units: list[UnitState],
    history: list[dict[str, Any]],
) -> None:
    state = {
        "config_hash": config_hash,
        "epochs_done": epochs_done,
        "net": net.state_dict(),
        "optimizers": [s.optimizer.state_dict() if s.optimizer else None for s in units],
        "history": history,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(
    path: Path, config_hash: str, device: torch.device, net: LocalNetwork, units: list[UnitState]
) -> Resumed:
    """Restore ``net``, the optimisers and the random generators from ``path``; refuse a missing or foreign
    file, or one made with another configuration (:class:`ResumeError`, saying what to do)."""
    if not path.is_file():
        raise ResumeError(
            f"--resume: no checkpoint at {path}; run without --resume to start this run (with --overwrite "
            "if its folder holds an earlier run)"
        )
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise ResumeError(f"--resume: cannot read checkpoint {path}: {exc}") from None
    if not isinstance(state, dict):
        raise ResumeError(
            f"--resume: {path} is not a cawbench checkpoint; run without --resume to start over"
        )
    if state.get("config_hash") != config_hash:
        raise ResumeError(
            f"--resume: checkpoint {path} was made with config hash {state.get('config_hash')}, but this "
            f"configuration hashes to {config_hash} (compare {path.parent / 'config.yaml'}); "
            "resume with the same configuration or choose another --run-name"
        )
    try:
        return _restore(state, net, units)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:  # edited or foreign
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or repr(exc)
        raise ResumeError(
            f"--resume: checkpoint {path} does not fit this run's network or optimisers ({detail[:300]}); "
            "it was edited or written by another version: run without --resume (with --overwrite) to "
            "start over, or choose another --run-name"
        ) from None


def _restore(state: dict[str, Any], net: LocalNetwork, units: list[UnitState]) -> Resumed:
    net.load_state_dict(state["net"])
    for s, o in zip(units, state["optimizers"], strict=True):
        if s.optimizer is not None and o is not None:
            s.optimizer.load_state_dict(o)  # the LR is re-set from the schedule at the next step
            _check_optimizer_shapes(s.optimizer)
    resumed = Resumed(list(state["history"]), int(state["epochs_done"]))
    torch.set_rng_state(state["rng_cpu"].cpu())
    if state.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["rng_cuda"]])
    return resumed


def _check_optimizer_shapes(opt: torch.optim.Optimizer) -> None:
    """Loaded optimiser state must match its parameters' shapes (torch checks only the group sizes)."""
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                    raise ValueError(
                        f"optimiser state {key!r} has shape {tuple(value.shape)}, parameter {tuple(p.shape)}"
                    )
