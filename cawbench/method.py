"""What a method declares: local units with named loss terms, class scores, defaults and recipes.

A method file (``methods/<name>.py``) subclasses :class:`Method`, registers it with
``@register_method("name")`` and holds only maths and the papers' numbers. The engine
(:mod:`cawbench.engine`) never names a method.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from cawbench.archs import ArchPlan, Wiring
from cawbench.config import (
    ConfigError,
    EmptyParams,
    RunConfig,
    build_run_config,
    flatten,
    set_dotted,
    to_plain,
)
from cawbench.data import DataInfo
from cawbench.registry import Registry


@dataclass
class UnitOutput:
    passed: torch.Tensor  # what the next unit receives (the engine detaches it)
    scores: torch.Tensor | None = None  # [B, K] class scores of this unit, or None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # whatever local_losses needs


@dataclass(frozen=True)
class StepContext:
    """Where one training batch stands on the run's schedules (built by the engine for every batch).

    ``at`` is the position on the recipe's epoch axis that every epoch-indexed schedule reads: the epoch
    index itself, or, with ``train.budget_schedules``, training progress mapped onto the recipe's horizon
    (fractional, updated every step). ``weights`` and ``active`` are the method's loss weights and the
    units that train at that position."""

    epoch: int  # 0-based
    epochs: int
    step: int  # batch index within the epoch
    at: float | None = None  # schedule position in reference epochs; None: the epoch index
    weights: Mapping[str, float] = field(default_factory=dict)  # loss-term weights (missing terms: 1)
    active: Sequence[bool] | None = None  # per unit: trains on this batch; None: every unit

    def __post_init__(self) -> None:
        if self.at is None:
            object.__setattr__(self, "at", float(self.epoch))

    def trains(self, unit_index: int) -> bool:
        return self.active is None or self.active[unit_index]


@dataclass
class SharedTerms:
    """Loss terms of several units computed together: ``terms[name][j]`` (unweighted, with its graph to the
    parameters of unit ``units[j]``, a position in the list given to :meth:`Method.share_pieces`) is that
    unit's term ``name``; the engine weights it with the unit's loss weights, logs it as the unit's own and
    backpropagates it together with the unit's other terms."""

    units: list[int]
    terms: dict[str, torch.Tensor]


@dataclass
class Handoff:
    """Tensors computed together for several units and handed to their forwards detached: ``leaves`` (each
    requiring grad, e.g. ``source.detach().unbind(0)``) are what the units use; once every unit has
    backpropagated, the engine sends the leaves' gradients on through ``source``
    (``assemble(leaf gradients)`` is source's gradient)."""

    source: torch.Tensor
    leaves: list[torch.Tensor]
    assemble: Callable[[list[torch.Tensor]], torch.Tensor] = torch.stack


@dataclass
class Gathered:
    """Parameters of several units gathered into one tensor for a shared computation: ``leaf`` (made
    without a graph, then requiring grad, e.g. ``torch.cat(params)``) is what the computation reads; after
    the backward the engine gives ``params[i]`` the gradient ``split(leaf.grad)[i]`` (autograd through
    ``torch.cat(params)`` would scatter it back one parameter at a time, a few ops per unit)."""

    leaf: torch.Tensor
    params: list[torch.Tensor]
    split: Callable[[torch.Tensor], Sequence[torch.Tensor]]


@dataclass
class SharedPieces:
    """What :meth:`Method.share_pieces` computed for the units of one step; ``release`` makes the units
    compute everything themselves again (the engine calls it when the step's updates are done)."""

    terms: list[SharedTerms] = field(default_factory=list)
    handoffs: list[Handoff] = field(default_factory=list)
    gathered: list[Gathered] = field(default_factory=list)
    release: Callable[[], None] = lambda: None


class LocalUnit(nn.Module):
    """One independently trained piece of a network: its own optimiser, its own loss, detached input."""

    #: whether forward() returns class scores (a "layer" for readouts and per-layer accuracy)
    emits_scores: bool = True
    #: per-unit optimiser overrides, e.g. {"name": "sgd", "lr": 0.01} for a softmax head
    optim_overrides: dict[str, Any] | None = None

    def forward(self, x: torch.Tensor) -> UnitOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def local_losses(
        self, out: UnitOutput, target: torch.Tensor, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        """Named, unweighted loss terms; the method's ``loss_weights`` scales them."""
        return {}

    def trainable_at(self, at: float) -> bool:
        """False outside this unit's training window (CwComp's interleaved layer training); ``at`` is the
        schedule position in the recipe's epochs (fractional under ``train.budget_schedules``)."""
        return True

    def set_schedule(self, at: float) -> None:
        """Epoch-indexed schedules inside the unit (CAW-Conv's temperature decay), at schedule position
        ``at``. Called before the unit trains on a batch whenever ``at`` has moved: once per epoch, or every
        step under ``train.budget_schedules``."""

    def on_epoch_start(self, epoch: int) -> None:
        """Structural per-epoch events that are not schedules (CaFo's BN calibration epoch)."""

    def epoch_stats(self) -> dict[str, float]:
        """Scalars recorded every epoch (e.g. the temperature)."""
        return {}

    def artifacts(self) -> dict[str, torch.Tensor]:
        """Tensors saved at the end of a run (e.g. the channel-to-class assignment)."""
        return {}


class LocalNetwork(nn.Module):
    """Units in sequence; between them the plan's residual ops run on detached tensors."""

    def __init__(self, units: list[LocalUnit], plan: ArchPlan | None = None, stem: nn.Module | None = None):
        super().__init__()
        self.units = nn.ModuleList(units)
        self.stem = stem if stem is not None else nn.Identity()
        self.wiring = Wiring(plan) if plan is not None else None

    def advance(
        self, index: int, passed: torch.Tensor, shortcut: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next unit's input from this unit's (detached) output and the running shortcut."""
        if passed.requires_grad:  # (a tensor without a graph needs no detached alias)
            passed = passed.detach()
        if self.wiring is not None and index < len(self.wiring.ops):
            return self.wiring.apply(index, passed, shortcut)
        return passed, shortcut

    @torch.no_grad()
    def layer_scores(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Class scores of every scoring unit, in order (eval forward, no updates)."""
        h, shortcut, scores = self.stem(x), None, []
        for i, unit in enumerate(self.units):
            out = unit(h)
            if out.scores is not None:
                scores.append(out.scores.float())
            h, shortcut = self.advance(i, out.passed, shortcut)
        return scores


class Method:
    """Base class: subclass, set the class attributes, implement :meth:`build`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyParams
    #: dotted-key defaults applied on top of the global defaults (e.g. {"optim.lr": 0.08})
    defaults: ClassVar[dict[str, Any]] = {}
    #: recipe name -> dataset name -> dotted-key overrides, e.g. recipes["paper"]["cifar10"]
    recipes: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}
    #: dotted-key overrides that make a seconds-long CPU run on the `synthetic` dataset (contract tests)
    smoke_overrides: ClassVar[dict[str, Any]] = {"model.width": 0.1}

    # -- how the method is compared and reported (read through :func:`method_report_info`)
    #: the name reports show (default: the registered name)
    report_label: ClassVar[str | None] = None
    #: its place in tables, smaller first; from TAIL_ORDER on its configurations come after a study's own
    #: variants (DeeperForward, the far end of the ablation ladder; the backprop reference)
    report_order: ClassVar[int] = 500
    #: how paper tables (``studies/paper_results.csv``) name it, matched ignoring case and punctuation
    #: (default: its label)
    paper_names: ClassVar[tuple[str, ...]] = ()
    #: the end-to-end backprop reference every other method is compared with (exactly one method)
    end_to_end: ClassVar[bool] = False
    #: the reference's recipe that trains this method's network end to end (its BP twin), if any
    bp_twin: ClassVar[str | None] = None
    #: recipes this method brings for the reference: its BP twins, recipe -> dataset -> overrides of the
    #: reference's config (e.g. ``{"paper-ff": {...}}``); they join the reference's recipes on registration
    bp_twin_recipes: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        self.cfg = cfg
        self.params = cfg.params
        self.info = info

    def build(self) -> LocalNetwork:  # pragma: no cover - interface
        raise NotImplementedError

    def loss_weights(self, at: float) -> dict[str, float]:
        """Weight of each named loss term at schedule position ``at`` (the recipe's epochs); terms not named
        get weight 1."""
        return {}

    def epoch_schedules(self) -> list[str]:
        """The epoch-indexed schedules this configuration drives besides the learning rate (names, for
        messages): what ``train.budget_schedules`` rescales. Empty: nothing to rescale."""
        return []

    def share_pieces(
        self, units: Sequence[LocalUnit], targets: Sequence[torch.Tensor], ctxs: Sequence[StepContext]
    ) -> SharedPieces | None:
        """Loss pieces that several units of one step compute alike, computed once for all of them
        (``train.merge_units=all``): e.g. every unit's regularisers of its own parameters, batched over the
        units of one shape, or a target distribution shared by every unit that sees the same labels.

        Called by the engine before the forwards of ``units`` (the units about to train, their schedules
        set), with the labels each will see and its context; the units use what was handed to them until
        ``release``. The maths must be the units' own; only the float rounding may differ (batched
        reductions sum in another order). None (the default): nothing is shared."""
        return None

    def prepare_batch(self, x: torch.Tensor, y: torch.Tensor, training: bool) -> torch.Tensor:
        """Method-specific input construction (FF's label embedding); identity by default."""
        return x

    def eval_scores(self, net: LocalNetwork, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer class scores for evaluation; FF-style methods override (one pass per label)."""
        return net.layer_scores(x)

    def on_epoch_end(self, net: LocalNetwork, epoch: int) -> None:
        """Hook after the epoch's updates, before evaluation."""


def _load_methods() -> None:
    importlib.import_module("cawbench.methods")  # imports every module in methods/


METHODS: Registry[type[Method]] = Registry("method", loader=_load_methods)
#: recipe name -> (the method that declared it, its dataset table): recipes of the reference method that
#: other methods bring (their BP twins), so the reference's file names no other method
TWIN_RECIPES: Registry[tuple[str, dict[str, dict[str, Any]]]] = Registry("BP twin recipe")


def register_method(name: str):
    """Class decorator: register a :class:`Method` under ``name``, with the BP twin recipes it declares."""

    def decorate(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register_method({name!r}) must decorate a Method subclass")
        METHODS.add(name, cls)
        cls.name = name
        for recipe, table in cls.bp_twin_recipes.items():
            TWIN_RECIPES.add(recipe, (name, table))
        return cls

    return decorate


def unregister_method(name: str) -> None:
    """Remove a method and the twin recipes it brought (test-only methods)."""
    METHODS.remove(name)
    for recipe in [r for r in TWIN_RECIPES.names() if TWIN_RECIPES.get(r)[0] == name]:
        TWIN_RECIPES.remove(recipe)


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


def list_methods(filter: str = "*") -> list[str]:
    return METHODS.names(filter)


def reference_method() -> str:
    """The name of the end-to-end reference method (the one with ``end_to_end = True``: backprop)."""
    found = [n for n in METHODS.names() if METHODS.get(n).end_to_end]
    if len(found) != 1:
        raise ConfigError(
            f"exactly one method must be the reference (end_to_end = True); found {found or 'none'}"
        )
    return found[0]


def recipes_of(method: type[Method]) -> dict[str, dict[str, dict[str, Any]]]:
    """A method's recipes: its own, and for the reference method also the BP twins other methods declare."""
    table = dict(method.recipes)
    if method.end_to_end:
        METHODS.names()  # every method file imported: their twins registered
        for recipe in TWIN_RECIPES.names():
            owner, twin = TWIN_RECIPES.get(recipe)
            if recipe in table:
                raise ConfigError(
                    f"method {owner!r} declares BP twin recipe {recipe!r}, which {method.name!r} has"
                )
            table[recipe] = twin
    return table


#: report orders from this on sort after a study's own variants (ladder end, the reference)
TAIL_ORDER = 900
#: the order of a method that is not registered here (rows from another version of the suite)
UNKNOWN_ORDER = 500


@dataclass(frozen=True)
class MethodReportInfo:
    """How reports name, order and pair a method (the :class:`Method` attributes of the same meaning)."""

    name: str  # the registered name
    label: str  # display name, e.g. "CAW-Conv"
    order: int  # position in tables (lower first); >= TAIL_ORDER: after every other configuration
    bp_twin: str | None  # the reference's recipe that trains the same network; None for the reference
    paper_names: tuple[str, ...] = ()  # names of the method in paper_results.csv
    end_to_end: bool = False  # the backprop reference itself (the twin of the others)


def method_report_info(name: str) -> MethodReportInfo:
    """The report metadata of method ``name``, from its class. A name that is not registered (rows from
    another version of the suite) gets its name as label and a middle position."""
    if name not in METHODS:
        return MethodReportInfo(name, name, UNKNOWN_ORDER, None, (), False)
    cls = METHODS.get(name)
    label = cls.report_label or name
    return MethodReportInfo(
        name, label, int(cls.report_order), cls.bp_twin, tuple(cls.paper_names) or (label,), cls.end_to_end
    )


# --------------------------------------------------------------------------------- config resolution
def default_config_dict(method: type[Method]) -> dict[str, Any]:
    base = to_plain(RunConfig())
    base["method"] = method.name
    base["params"] = to_plain(method.Config())
    return base


def recipe_overrides(method: type[Method], recipe: str, dataset: str) -> dict[str, Any]:
    if recipe == "default":
        return {}
    recipes = recipes_of(method)
    if recipe not in recipes:
        names = ", ".join(["default", *sorted(recipes)])
        raise ConfigError(f"method {method.name!r} has no recipe {recipe!r}; recipes: {names}")
    table = recipes[recipe]
    if dataset not in table:
        raise ConfigError(
            f"method {method.name!r} has no {recipe!r} recipe for dataset {dataset!r}; "
            f"it has one for: {', '.join(sorted(table))}"
        )
    return dict(table[dataset])


def resolve_config(*layers: dict[str, Any]) -> RunConfig:
    """Merge user layers (YAML dicts, CLI flags, overrides; later wins) over method defaults and recipe.

    Order: global defaults -> the method's defaults -> the recipe for the dataset -> each user layer.
    Keys may be nested dicts or dotted ("optim.lr"). Unknown keys and bad values raise ConfigError.
    """
    user: dict[str, Any] = {}
    for layer in layers:
        user.update(flatten(layer))
    method = get_method(str(user.get("method", "backprop")))
    dataset = str(user.get("data.name", RunConfig().data.name))
    recipe = str(user.get("recipe", "default"))
    nested = default_config_dict(method)
    for key, value in {**method.defaults, **recipe_overrides(method, recipe, dataset), **user}.items():
        _check_key(nested, key)
        set_dotted(nested, key, value)
    return build_run_config(nested, method.Config)


def _check_key(nested: dict[str, Any], key: str) -> None:
    """Reject keys that name no field, listing the valid keys of the section they point into."""
    node: Any = nested
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            section = ".".join(parts[:depth]) or "top level"
            valid = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
            raise ConfigError(f"unknown config key {key!r} (in {section}); valid keys there: {valid}")
        node = node[part]


def params_fields(method: type[Method]) -> list[str]:
    return [f.name for f in dataclasses.fields(method.Config)]
