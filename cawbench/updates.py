"""The units' updates of one training step, merged across units (``train.merge_units``), and the epoch sums.

A unit's forward reads only its own parameters, and its output is computed before its update and passed on
detached; so its update can wait until every other unit of the step has backpropagated, and the units'
updates can then run as one: the same maths with the same small ops issued once instead of once per unit.
Executors that interleave batches (the pipeline's ticks, its worker threads) merge the updates of the
units they run together, which still come before each unit's next forward. :class:`StepStats` also keeps
each term's value on a unit's first batch of the epoch.

- ``none``: each unit clips (``clip_grad_norm_``) and steps its own optimiser right after its backward.
- ``steps``: after the step's units have backpropagated, one clipping pass (:func:`clip_grad_norms_`: every
  unit's norm and factor in foreach ops), one optimiser call per optimiser kind and hyperparameters
  (:class:`MergedOptimizers`: torch.optim's own update over the units' concatenated parameter lists, each
  unit's optimiser keeping its own state), one update of the loss and accuracy sums (:class:`StepStats`).
  Bit for bit the ``none`` updates on the CPU (per-tensor kernels, norms reduced in the same order).
- ``all`` (default): ``steps``, plus the loss pieces a method computes for several units at once
  (:meth:`cawbench.method.Method.share_pieces`): equal maths, float rounding of batched reductions aside.
"""

from __future__ import annotations

import dataclasses
import threading
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

    ctxs: dict[int, StepContext]  # unit -> its context in this scope
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


# --------------------------------------------------------------------------------- epoch sums
class StepStats:
    """Per-unit sums over an epoch, kept on the device and read once at its end (no host sync per step).

    Loss terms go into one ``[units, terms]`` table (a column per term name, added when the name first
    appears), accuracies into ``[units]`` vectors, each update one ``index_add_`` for all the units it
    records. Updates are in place (a captured CUDA graph that replays the step keeps accumulating) and touch
    only the rows of the units they record (pipeline workers record their own units concurrently).
    ``weighted``: also sum weight x term every step (the weights move within an epoch under
    ``train.budget_schedules``); otherwise the weighted means are the epoch's weight times the mean."""

    def __init__(self, n_units: int, device: torch.device, weighted: bool = False) -> None:
        self.n_units, self.device = n_units, device
        self.names: list[str] = []  # the table's columns (the first len(names) of its capacity)
        self.sums = torch.zeros(n_units, TERM_COLUMNS, device=device)
        self.weighted_sums = torch.zeros(n_units, TERM_COLUMNS, device=device) if weighted else None
        # each term's value on the first batch a unit computed it this epoch (a scale for divergence checks)
        self.firsts = torch.zeros(n_units, TERM_COLUMNS, device=device)
        self._first_cells: set[tuple[int, int]] = set()
        self.logged: list[set[str]] = [set() for _ in range(n_units)]  # the terms each unit recorded
        self.correct = torch.zeros(n_units, device=device)
        self.seen = torch.zeros(n_units, device=device)
        self.steps = 0
        self.active_steps = [0] * n_units  # steps in which each unit trained (the mean's denominator)
        self._lock = threading.Lock()

    def count_step(self, ctx: StepContext) -> None:
        """One batch went (or goes) through every unit; called once per batch by every executor."""
        self.steps += 1
        for i in range(len(self.active_steps)):
            self.active_steps[i] += ctx.trains(i)

    # -- recording
    def add_terms(self, i: int, terms: dict[str, torch.Tensor], weights: Mapping[str, float]) -> None:
        self.add([(i, terms, weights)])

    def add_scores(self, i: int, scores: torch.Tensor, y: torch.Tensor) -> None:
        self.add(scores=[(i, scores, y)])

    @torch.no_grad()
    def add(
        self,
        terms: Sequence[tuple[int, dict[str, torch.Tensor], Mapping[str, float]]] = (),
        vectors: Sequence[tuple[list[int], str, torch.Tensor, list[float]]] = (),
        scores: Sequence[tuple[int, torch.Tensor, torch.Tensor]] = (),
    ) -> None:
        """Record loss terms (unit, {name: 0-d value}, loss weights), term vectors (units, name, one value
        per unit, each unit's weight) and class scores (unit, [B, K] scores, labels)."""
        with self._lock:
            if terms or vectors:
                self._add_terms(terms, vectors)
            if scores:
                self._add_scores(scores)

    def _add_terms(self, terms, vectors) -> None:
        cells, values, weights = [], [], []
        for i, named, unit_weights in terms:
            for name, value in named.items():
                cells.append((i, self._column(name, i)))
                values.append(value.float())
                weights.append(unit_weights.get(name, 1.0))
        parts, scaled = [torch.stack(values)] if values else [], []
        if values and self.weighted_sums is not None:
            scaled.append(torch.stack(torch._foreach_mul(values, weights)))
        for units, name, vector, unit_weights in vectors:
            cells += [(i, self._column(name, i)) for i in units]
            parts.append(vector.float())
            if self.weighted_sums is not None:
                scaled.append(_scaled(vector.float(), unit_weights))
        width = self.sums.shape[1]
        index = self._index(("cells", width, *cells), [i * width + j for i, j in cells])
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        self.sums.view(-1).index_add_(0, index, flat)
        self._keep_firsts(cells, index, flat)
        if self.weighted_sums is not None:
            self.weighted_sums.view(-1).index_add_(
                0, index, scaled[0] if len(scaled) == 1 else torch.cat(scaled)
            )

    def _keep_firsts(self, cells: list[tuple[int, int]], index: torch.Tensor, flat: torch.Tensor) -> None:
        new = [k for k, cell in enumerate(cells) if cell not in self._first_cells]
        if not new:  # every step after a unit's first in the epoch
            return
        if len(new) < len(cells):  # e.g. a pipeline filling up: one more unit's first batch per tick
            width, fresh = self.sums.shape[1], [cells[k] for k in new]
            index = self._index(("cells", width, *fresh), [i * width + j for i, j in fresh])
            flat = flat[self._index(("positions", *new), new)]
        self.firsts.view(-1).index_copy_(0, index, flat)
        self._first_cells.update(cells)

    def _add_scores(self, scores) -> None:
        groups: dict[tuple, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for i, s, y in scores:  # one pass per score shape and label tensor (a pipeline tick has several)
            groups.setdefault((tuple(s.shape), id(y)), []).append((i, s, y))
        for group in groups.values():
            units = [i for i, _, _ in group]
            stacked = torch.stack([s for _, s, _ in group])  # [n, B, K]
            labels = group[0][2][: stacked.shape[1]]
            hits = (stacked.argmax(-1) == labels).sum(-1, dtype=self.correct.dtype)
            index = self._index(("units", *units), units)
            self.correct.index_add_(0, index, hits)
            count = self._index(
                ("count", len(units), stacked.shape[1]), [float(stacked.shape[1])] * len(units)
            )
            self.seen.index_add_(0, index, count)

    def _column(self, name: str, unit: int) -> int:
        self.logged[unit].add(name)
        if name not in self.names:  # a new term: the next free column (eager steps come before any capture)
            self.names.append(name)
            if len(self.names) > self.sums.shape[1]:
                self.sums, self.firsts = _widen(self.sums), _widen(self.firsts)
                if self.weighted_sums is not None:
                    self.weighted_sums = _widen(self.weighted_sums)
        return self.names.index(name)

    def _index(self, key: tuple, values: list) -> torch.Tensor:
        """A constant index (or count) tensor, made once per process and device (not once per epoch)."""
        key = (self.device, *key)
        found = _CONSTANTS.get(key)
        if found is None:
            dtype = torch.float32 if values and isinstance(values[0], float) else torch.long
            found = _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=self.device)
        return found

    # -- reading
    def means(
        self,
    ) -> tuple[list[str], list[list[float]], list[list[float]] | None, list[list[float]]]:
        """Term names (sorted) and, per unit and term: the mean over the steps the unit trained; the
        weighted mean when summed every step (else None); the value on the unit's first batch of the epoch.
        NaN where the unit logged no such term. One transfer from the device."""
        steps = torch.tensor([max(a, 1) for a in self.active_steps], dtype=self.sums.dtype)
        tables = [self.sums] + ([self.weighted_sums] if self.weighted_sums is not None else [])
        means = (torch.stack(tables) / steps.to(self.device)[:, None]).tolist()
        means.append(self.firsts.tolist())
        names = sorted(self.names)
        columns = [self.names.index(name) for name in names]  # capacity past len(names) stays unread
        nan = float("nan")
        tables = [
            [[row[j] if name in self.logged[i] else nan for j, name in zip(columns, names)] for i, row in
             enumerate(table)]
            for table in means
        ]  # fmt: skip
        return names, tables[0], (tables[1] if len(tables) > 2 else None), tables[-1]


#: columns a StepStats table starts with (methods log 1-3 terms; more double it)
TERM_COLUMNS = 4
#: index and count tensors of StepStats, by device and layout: a handful per run
_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _widen(table: torch.Tensor) -> torch.Tensor:
    return torch.cat([table, torch.zeros_like(table)], 1)


def _scaled(vector: torch.Tensor, weights: list[float]) -> torch.Tensor:
    if all(w == weights[0] for w in weights):
        return vector * weights[0]
    return torch.stack(torch._foreach_mul(list(vector.unbind()), weights))
