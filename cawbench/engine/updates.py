"""The units' updates of one training step, merged across units (``train.merge_units``).

A unit's forward reads only its own parameters, and its output is computed before its update and passed on
detached; so its update can wait until every other unit of the step has backpropagated, and the units'
updates can then run as one: the same maths with the same small ops issued once instead of once per unit.
:meth:`cawbench.engine.step.BatchStep.updates` opens an update scope; every executor scopes its units: the
sequential and streams steps (the whole step, on the streams after they join), a captured CUDA-graph step,
a pipeline tick (the units it runs), a pipeline worker's batch (its group of units); each unit's update
still comes before its next forward.

- ``none``: each unit clips (``clip_grad_norm_``) and steps its own optimiser right after its backward.
- ``steps``: after the scope's units have backpropagated, one clipping pass (:func:`clip_grad_norms_`: every
  unit's norm and factor in foreach ops), one optimiser call per optimiser kind and hyperparameters
  (:class:`MergedOptimizers`: torch.optim's own update over the units' concatenated parameter lists, each
  unit's optimiser keeping its own state), one update of the loss and accuracy sums
  (:class:`~cawbench.engine.stats.StepStats`). Bit for bit the ``none`` updates on the CPU (per-tensor
  kernels, norms reduced in the same order).
- ``all`` (default): ``steps``, plus the loss pieces a method computes for several units at once
  (:meth:`cawbench.method.Method.share_pieces`): equal maths, float rounding of batched reductions aside.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils._foreach_utils import _has_foreach_support

from cawbench.method import SharedPieces, StepContext

MERGE_MODES = ("none", "steps", "all")


# --------------------------------------------------------------------------------- what a step leaves
@dataclasses.dataclass
class PendingUpdates:
    """What the units of one update scope (a step, a pipeline tick, a pipeline worker's batch) leave for
    the merged update: who backpropagated, their loss terms and scores, the method's shared pieces."""

    ctxs: dict[int, StepContext]  # unit -> its step state (schedule point) in this scope
    stats: Any = None  # the epoch's StepStats the scope's sums go to
    shared: SharedPieces | None = None
    shared_units: list[int] = dataclasses.field(default_factory=list)  # share_pieces' positions -> units
    trained: list[int] = dataclasses.field(default_factory=list)
    terms: list[tuple[int, dict[str, torch.Tensor], Mapping[str, float]]] = dataclasses.field(
        default_factory=list
    )
    scores: list[tuple[int, torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)
    vectors: list[tuple[list[int], str, torch.Tensor, list[float]]] = dataclasses.field(default_factory=list)

    def release(self) -> None:
        if self.shared is not None:
            self.shared.release()
            self.shared = None


# --------------------------------------------------------------------------------- clipping
@torch.no_grad()
def clip_grad_norms_(param_lists: Sequence[Sequence[torch.Tensor]], max_norms: Sequence[float]) -> None:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)`` for every (params, max_norm) pair, all pairs in
    a handful of foreach ops: each list's total 2-norm over its gradients, each scaled by its own
    ``min(max_norm / (norm + 1e-6), 1)``. On the CPU bit for bit the per-list calls (the per-tensor norms,
    then each list's norm of its stacked norms, as clip_grad_norm_ reduces them)."""
    lists = [[p.grad for p in params if p.grad is not None] for params in param_lists]
    keep = [(grads, float(m)) for grads, m in zip(lists, max_norms, strict=True) if grads]
    if not keep:
        return
    flat = [g for grads, _ in keep for g in grads]
    device = flat[0].device
    if len({(g.device, g.dtype) for g in flat}) > 1 or not _has_foreach_support(flat, device):
        for params, m in zip(param_lists, max_norms, strict=True):  # torch's own, list by list
            torch.nn.utils.clip_grad_norm_(params, m)
        return
    per_list = torch.stack(torch._foreach_norm(flat, 2.0)).split([len(grads) for grads, _ in keep])
    totals = torch.stack(torch._foreach_norm(list(per_list), 2.0))
    inverse = (totals + 1e-6).reciprocal()  # max_norm / x is computed as x.reciprocal() * max_norm
    norms = [m for _, m in keep]
    if all(m == norms[0] for m in norms):
        coef = inverse * norms[0]
    else:
        coef = torch.stack(torch._foreach_mul(list(inverse.unbind()), norms))
    coefs = coef.clamp(max=1.0).unbind()
    if device.type == "cpu":  # one call; the CPU's foreach ops loop over the tensors anyway
        torch._foreach_mul_(flat, [c for c, (grads, _) in zip(coefs, keep) for _ in grads])
    else:  # a list of differently shaped factors would leave the fused kernel: one call per list
        for c, (grads, _) in zip(coefs, keep):
            torch._foreach_mul_(grads, c)


# --------------------------------------------------------------------------------- optimisers
class _RoutedState(dict):
    """A merged call's ``state``: every parameter's entry is its own optimiser's, read and written there."""

    def __init__(self, owners: dict[torch.Tensor, torch.optim.Optimizer]) -> None:
        super().__init__()
        self._owners = owners

    def __missing__(self, param: torch.Tensor) -> dict[str, Any]:
        return self._owners[param].state[param]


def _merge_key(opt: torch.optim.Optimizer) -> tuple | None:
    """What must be equal for two optimisers to step in one call: their class and every hyperparameter but
    the learning rate. None: step this one alone (several groups, hooks, unhashable settings)."""
    if len(opt.param_groups) != 1 or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks:
        return None
    group = opt.param_groups[0]
    settings = tuple(sorted((k, v) for k, v in group.items() if k not in ("params", "lr")))
    try:
        hash(settings)
    except TypeError:
        return None
    return (type(opt), settings)


class MergedOptimizers:
    """Steps many units' optimisers with one call per (class, hyperparameters, learning rate): a stand-in
    optimiser of the same class holds the concatenated parameter lists and routes each parameter's state to
    its own optimiser, so torch.optim's own update runs once (one fused or foreach kernel per tensor list)
    and every unit's state, step counts and checkpoints stay its own."""

    def __init__(self) -> None:
        self._standins: dict[tuple, torch.optim.Optimizer] = {}

    def step(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        buckets: dict[tuple, list[torch.optim.Optimizer]] = {}
        for opt in optimizers:
            key = _merge_key(opt)
            lr = opt.param_groups[0]["lr"]
            if key is None or not isinstance(lr, float | int):
                opt.step()
                continue
            buckets.setdefault((key, lr), []).append(opt)
        for (key, lr), opts in buckets.items():
            if len(opts) == 1:
                opts[0].step()
                continue
            standin = self._standin(key, opts)
            standin.param_groups[0]["lr"] = lr
            standin.step()

    def _standin(self, key: tuple, opts: list[torch.optim.Optimizer]) -> torch.optim.Optimizer:
        ident = (key, tuple(id(o) for o in opts))
        standin = self._standins.get(ident)
        if standin is None:
            params = [p for o in opts for p in o.param_groups[0]["params"]]
            settings = {k: v for k, v in opts[0].param_groups[0].items() if k != "params"}
            standin = type(opts[0])([{**settings, "params": params}])
            standin.state = _RoutedState({p: o for o in opts for p in o.param_groups[0]["params"]})
            self._standins[ident] = standin
        return standin
