"""The epoch's running sums of one training run (:class:`StepStats`): loss terms, weighted terms, first-batch
values and accuracies per unit, kept on the device and read back once per epoch
(:func:`cawbench.engine.records.epoch_means`)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import torch

from cawbench.method import StepContext


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
