"""Study specs: a YAML file saying what to train, over which configurations and seeds, and how to search.

Schema (top-level keys; anything else is an error naming the key)::

    name: caw_ablation                 # required; the Optuna study is "<name>-<scale>"
    description: ...
    base: {method: caw_conv, data.name: fashion-mnist, recipe: paper}   # config keys of every trial
    scales:                            # required; --scale picks one; config overrides, plus optionally
      cpu:                             # n_trials / seeds for that scale, and per-variant overrides
        model.width: 0.2
        train.epochs: 2
        seeds: [0]
        variants: {cwcomp: {model.width: 0.5}}   # applied after the variant's own overrides
        variant_subset: [caw_conv, cwcomp]       # optional: only these variants run at this scale
      paper: {}
    default_scale: cpu                 # optional (default: cpu if present, else the first scale)
    variants:                          # optional: named config overrides, a categorical axis "variant"
      caw_conv: {}
      minus_entropy: {params.lambda_entropy: 0.0}
      minus_both: {extends: minus_entropy, params.lambda_ortho: 0.0}   # minus_entropy's overrides + its own
    search_space:                      # optional: config key -> distribution
      params.lambda_entropy: {type: float, low: 1.0e-4, high: 1.0, log: true}
      model.depth: {type: int, low: 1, high: 3}
      optim.name: {type: categorical, choices: [adam, sgd]}
    reference: caw_conv                # variant that paired deltas are computed against (reports)
    seeds: [0, 1, 2]                   # every configuration runs on this same seed set (default [0])
    objective: {metric: final_val_acc, direction: maximize}   # a validation metric, never test
    sampler: {name: grid | tpe | random | qmc, seed: 0, ...sampler options}
    pruner: {name: none | median | percentile | successive_halving | hyperband, ...pruner options}
    n_trials: null                     # configurations to draw (tpe/random/qmc); grid: the whole grid

``extends: NAME`` in a variant takes the overrides of a variant declared before it (with its own
``extends`` already applied) and adds its own on top, so the rungs of a ladder each name one change. It
inherits only the ``variants:`` entry; a scale's per-variant overrides apply to the variant they name.

A trial's config is resolved as: method defaults -> recipe -> ``base`` -> the scale's overrides -> the
variant's overrides -> the scale's overrides for that variant -> the sampled search-space values ->
``train.seed`` (set by the runner). The recipe is looked up with the final ``method``/``data.name``.

**Seeds and trials.** One Optuna trial trains one configuration with one seed. A *configuration* is a
variant plus a point of the search space; it gets a ``config_id`` and each of its seeds a
``plan_key = "<config_id>/seed=<s>"`` (both stored as trial user attributes, as are ``seed`` and
``seed_index``). How the seed set is guaranteed:

- ``grid`` and ``qmc`` studies are *planned*: every (configuration, seed) pair is known up front (the full
  grid of variants x categorical/stepped dimensions; or the first ``n_trials`` points of a scrambled Sobol
  sequence, drawn with ``scipy.stats.qmc`` and the sampler seed) and is enqueued into the study as a
  waiting trial with fixed parameters.
- ``tpe`` and ``random`` studies are *adaptive*: the sampler proposes a configuration, which runs with the
  first seed; once that trial completes (not pruned, not failed), the same parameters are enqueued for the
  remaining seeds, which are never pruned. A pruned configuration therefore costs one seed, and every
  configuration that survives runs on the full seed set. ``n_trials`` counts configurations, not trials.
  Pruning is only allowed here: a planned study must cover its whole plan.

Enqueueing is idempotent (keyed by ``plan_key``) and runs under a storage-wide lock, so re-running a spec,
or starting several workers at once, never duplicates a trial; see :mod:`cawbench.studies.runner`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cawbench.config import ConfigError, flatten

TOP_LEVEL_KEYS = (
    "name", "description", "base", "scales", "default_scale", "variants", "search_space", "reference",
    "seeds", "objective", "sampler", "pruner", "n_trials",
)  # fmt: skip
SCALE_STUDY_KEYS = ("n_trials", "seeds", "variants", "variant_subset")  # study keys; the rest is config
RUNNER_OWNED_KEYS = ("train.seed", "out_dir", "run_name")  # set per trial by the runner
OBJECTIVE_METRICS = ("final_val_acc", "best_val_acc")  # validation accuracy (%); selection never sees test
SAMPLERS = ("grid", "tpe", "random", "qmc")
PLANNED_SAMPLERS = ("grid", "qmc")
SAMPLER_OPTIONS = {
    "grid": ("seed",),
    "qmc": ("seed", "scramble"),
    "random": ("seed",),
    "tpe": ("seed", "n_startup_trials", "n_ei_candidates", "multivariate", "constant_liar", "group"),
}
PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband")
DIMENSION_TYPES = ("float", "int", "categorical")
DIMENSION_KEYS = {
    "float": ("type", "low", "high", "log", "step"),
    "int": ("type", "low", "high", "log", "step"),
    "categorical": ("type", "choices"),
}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


# ------------------------------------------------------------------------------------------ dimensions
@dataclass(frozen=True)
class Dimension:
    """One search-space axis: a config key and its distribution."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def grid_values(self) -> list[Any]:
        """The values a grid visits: the choices, or low..high in steps."""
        if self.type == "categorical":
            return list(self.choices)
        if self.step is None and self.type == "float":
            raise ConfigError(
                f"search_space.{self.key}: a grid needs finite values; give this float dimension a step "
                "or make it categorical with explicit choices"
            )
        step = self.step or 1
        n = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        values = [self.low + i * step for i in range(n)]
        return [int(v) for v in values] if self.type == "int" else [float(v) for v in values]

    def from_unit(self, u: float) -> Any:
        """Map u in [0, 1) to a value (for quasi-random plans): log-uniform where ``log``."""
        u = min(max(u, 0.0), math.nextafter(1.0, 0.0))
        if self.type == "categorical":
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        if self.type == "int":
            if self.log:
                lo, hi = math.log(self.low), math.log(self.high + 1)
                return int(min(self.high, max(self.low, math.floor(math.exp(lo + u * (hi - lo))))))
            step = int(self.step or 1)
            n = (int(self.high) - int(self.low)) // step + 1
            return int(self.low) + step * min(int(u * n), n - 1)
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        elif self.step is not None:
            n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
            value = self.low + self.step * min(int(u * n), n - 1)
        else:
            value = self.low + u * (self.high - self.low)
        return float(min(self.high, max(self.low, value)))  # exp/log round-off must stay inside bounds

    def representative_values(self) -> list[Any]:
        """Values enough to check that every part of the range makes a valid config."""
        if self.type == "categorical":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.type == "int" else [self.low, self.high]


def parse_dimension(key: str, raw: Any, where: str) -> Dimension:
    here = f"{where}.{key}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{here} must be a mapping like {{type: float, low: 0.001, high: 1, log: true}}")
    kind = raw.get("type")
    if kind not in DIMENSION_TYPES:
        raise ConfigError(f"{here}.type={kind!r} is not valid; choose one of: {', '.join(DIMENSION_TYPES)}")
    _reject_unknown(raw, DIMENSION_KEYS[kind], here)
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{here}: a categorical dimension needs a non-empty list `choices`")
        for c in choices:
            if not (c is None or isinstance(c, (bool, int, float, str))):
                raise ConfigError(f"{here}: choice {c!r} must be a number, string, bool or null")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise ConfigError(f"{here}: choices {choices!r} contain duplicates")
        return Dimension(key, kind, choices=tuple(choices))
    for bound in ("low", "high"):
        value = raw.get(bound)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{here}.{bound} must be a finite number, got {value!r}")
        if kind == "int" and not float(value).is_integer():
            raise ConfigError(f"{here}.{bound} must be an integer for type int, got {value!r}")
    low, high = raw["low"], raw["high"]
    if not low < high:
        raise ConfigError(f"{here}: low ({low!r}) must be below high ({high!r})")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{here}.log must be true or false, got {log!r}")
    step = raw.get("step")
    if log and low <= 0:
        raise ConfigError(f"{here}: log scale needs a positive lower bound, got low={low!r}")
    if step is not None:
        if log:
            raise ConfigError(f"{here}: `step` and `log: true` cannot be combined (Optuna forbids it)")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
            raise ConfigError(f"{here}.step must be a positive number, got {step!r}")
        if kind == "int" and not float(step).is_integer():
            raise ConfigError(f"{here}.step must be an integer for type int, got {step!r}")
    if kind == "int":
        return Dimension(key, kind, int(low), int(high), log, int(step) if step is not None else None)
    return Dimension(key, kind, float(low), float(high), log, float(step) if step is not None else None)


# ------------------------------------------------------------------------------------------ the spec
@dataclass(frozen=True)
class PlanItem:
    """One planned trial: a configuration (variant + fixed parameters) and a seed."""

    config_id: str
    params: dict[str, Any]  # Optuna params: "variant" (when the spec has variants) + search-space keys
    seed: int
    seed_index: int

    @property
    def plan_key(self) -> str:
        return plan_key(self.config_id, self.seed)


def plan_key(config_id: str, seed: int) -> str:
    return f"{config_id}/seed={seed}"


@dataclass(frozen=True)
class StudySpec:
    name: str
    description: str
    base: dict[str, Any]
    scales: dict[str, dict[str, Any]]  # scale -> flat config overrides (study keys removed)
    scale_study: dict[str, dict[str, Any]]  # scale -> {n_trials, seeds} overrides
    default_scale: str
    variants: dict[str, dict[str, Any]]  # name -> flat overrides; empty: no variant axis
    search_space: tuple[Dimension, ...]
    reference: str | None
    seeds: tuple[int, ...]
    objective_metric: str
    direction: str
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    n_trials: int | None
    path: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    #: variant -> the variant it ``extends:`` (already folded into ``variants``; reports read the ladder)
    extends: dict[str, str] = field(default_factory=dict)

    # ---------------------------------------------------------------- per scale
    def check_scale(self, scale: str | None) -> str:
        scale = scale or self.default_scale
        if scale not in self.scales:
            raise ConfigError(f"study {self.name!r} has no scale {scale!r}; scales: {', '.join(self.scales)}")
        return scale

    def study_name(self, scale: str | None = None) -> str:
        return f"{self.name}-{self.check_scale(scale)}"

    def seeds_for(self, scale: str | None = None) -> tuple[int, ...]:
        return tuple(self.scale_study[self.check_scale(scale)].get("seeds", self.seeds))

    def n_trials_for(self, scale: str | None = None) -> int | None:
        return self.scale_study[self.check_scale(scale)].get("n_trials", self.n_trials)

    @property
    def sampler_name(self) -> str:
        return self.sampler["name"]

    @property
    def planned(self) -> bool:
        return self.sampler_name in PLANNED_SAMPLERS

    @property
    def variant_names(self) -> list[str]:
        return list(self.variants)

    def variants_for(self, scale: str | None = None) -> list[str]:
        """The variants that run at this scale: the scale's ``variant_subset``, else all, in spec order."""
        subset = self.scale_study[self.check_scale(scale)].get("variant_subset")
        return [v for v in self.variants if subset is None or v in subset]

    def fingerprint(self, scale: str | None = None) -> str:
        """Hash of what makes this study's trials comparable (not the budget, not the prose)."""
        scale = self.check_scale(scale)
        blob = {
            "base": self.base, "scale": self.scales[scale], "variants": self.variants,
            "scale_variants": self.scale_study[scale].get("variants", {}),
            "variant_subset": self.scale_study[scale].get("variant_subset"),
            "search_space": [d.__dict__ for d in self.search_space], "seeds": self.seeds_for(scale),
            "objective": [self.objective_metric, self.direction], "sampler": self.sampler,
            "pruner": self.pruner,
        }  # fmt: skip
        text = json.dumps(blob, sort_keys=True, default=str).encode()
        return hashlib.sha256(text).hexdigest()[:16]

    # ---------------------------------------------------------------- configurations
    def config_layers(self, scale: str, variant: str | None, sampled: dict[str, Any]) -> list[dict[str, Any]]:
        """The user layers of a trial's config, in precedence order (later wins)."""
        label = {"variant": variant} if variant is not None else {}
        overrides = self.variants.get(variant, {}) if variant is not None else {}
        at_scale = self.scale_study[scale].get("variants", {}).get(variant, {}) if variant is not None else {}
        return [self.base, label, self.scales[scale], overrides, at_scale, sampled]

    def resolve(self, scale: str, variant: str | None, sampled: dict[str, Any], seed: int, **extra: Any):
        """The trial's RunConfig (raises ConfigError naming the scale/variant when it does not resolve)."""
        from cawbench.method import resolve_config

        layers = self.config_layers(scale, variant, sampled)
        try:
            return resolve_config(*layers, {"train.seed": seed, **extra})
        except ConfigError as exc:
            where = f"scale {scale!r}" + (f", variant {variant!r}" if variant is not None else "")
            raise ConfigError(f"study {self.name!r} ({where}): {exc}") from None

    def split_params(self, params: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """Optuna params -> (variant, sampled config overrides)."""
        sampled = {k: v for k, v in params.items() if k != "variant"}
        return (params["variant"] if self.variants else None), sampled

    def method_of(self, scale: str, variant: str | None, sampled: dict[str, Any]) -> str:
        merged: dict[str, Any] = {}
        for layer in self.config_layers(scale, variant, sampled):
            merged.update(layer)
        return str(merged.get("method", "backprop"))

    def methods_used(self) -> dict[str, list[str]]:
        """method name -> where it is named (base, variant X, search_space)."""
        out: dict[str, list[str]] = {}
        for scale in self.scales:
            for name in self.variant_names or [None]:
                where = "base" if name is None else f"variant {name!r}"
                places = out.setdefault(self.method_of(scale, name, {}), [])
                if where not in places:
                    places.append(where)
        for dim in self.search_space:
            if dim.key == "method":
                for choice in dim.choices:
                    out.setdefault(str(choice), []).append("search_space.method")
        return out

    # ---------------------------------------------------------------- plans
    def plan(self, scale: str | None = None, n_trials: int | None = None) -> list[PlanItem]:
        """Every (configuration, seed) of a planned (grid/qmc) study, in a stable order."""
        scale = self.check_scale(scale)
        seeds = self.seeds_for(scale)
        configs = self._grid_configs(scale) if self.sampler_name == "grid" else self._qmc_configs(
            scale, n_trials or self.n_trials_for(scale)
        )  # fmt: skip
        return [
            PlanItem(config_id, params, seed, i)
            for config_id, params in configs
            for i, seed in enumerate(seeds)
        ]

    def _grid_configs(self, scale: str) -> list[tuple[str, dict[str, Any]]]:
        axes: list[tuple[str, list[Any]]] = []
        if self.variants:
            axes.append(("variant", self.variants_for(scale)))
        axes.extend((d.key, d.grid_values()) for d in self.search_space)
        out = []
        for values in itertools.product(*(v for _, v in axes)):
            params = dict(zip((k for k, _ in axes), values, strict=True))
            out.append((config_id_of(params, self.variants), params))
        return out

    def _qmc_configs(self, scale: str, n: int | None) -> list[tuple[str, dict[str, Any]]]:
        if not n:
            raise ConfigError(f"study {self.name!r}: the qmc sampler needs n_trials (points to draw)")
        from scipy.stats import qmc

        dims = list(self.search_space)
        with_variant = bool(self.variants)
        d = len(dims) + int(with_variant)
        scramble, seed = self.sampler.get("scramble", True), self.sampler.get("seed", 0)
        try:
            sobol = qmc.Sobol(d=d, scramble=scramble, rng=seed)
        except TypeError:  # scipy < 1.15 calls it `seed`
            sobol = qmc.Sobol(d=d, scramble=scramble, seed=seed)
        with warnings.catch_warnings():
            # Balance is exact for powers of 2 (the shipped specs use them); other budgets still work.
            warnings.filterwarnings("ignore", message=".*balance properties.*")
            points = sobol.random(n)
        out = []
        for i, u in enumerate(points):
            params: dict[str, Any] = {}
            if with_variant:
                names = self.variants_for(scale)
                params["variant"] = names[min(int(u[-1] * len(names)), len(names) - 1)]
            for dim, ui in zip(dims, u, strict=False):
                params[dim.key] = dim.from_unit(float(ui))
            out.append((f"q{i:04d}", params))
        return out


def config_id_of(params: dict[str, Any], variants: dict[str, Any]) -> str:
    """A readable, stable id of a planned configuration (variant first, then key=value)."""
    parts = []
    if variants and "variant" in params:
        parts.append(str(params["variant"]))
    for key, value in params.items():
        if key != "variant":
            parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return ",".join(parts) or "base"


# ------------------------------------------------------------------------------------------ loading
def _reject_unknown(d: dict[str, Any], valid: tuple[str, ...], where: str) -> None:
    unknown = [k for k in d if k not in valid]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; valid keys: {', '.join(valid)}")


def _config_mapping(raw: Any, where: str) -> dict[str, Any]:
    """A config-override mapping (nested or dotted) -> flat dotted dict."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of config keys (e.g. optim.lr: 0.01), got {raw!r}")
    flat = flatten(raw)
    for key in flat:
        if key in RUNNER_OWNED_KEYS:
            hint = (
                "use the top-level `seeds:` list" if key == "train.seed" else "the runner sets it per trial"
            )
            raise ConfigError(f"{where}.{key} cannot be set in a study spec ({hint})")
    return flat


def _variant_overrides(name: str, raw: Any, earlier: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A variant's flat overrides; ``extends: OTHER`` starts from those of a variant declared before it (already
    resolved, so chains work), its own keys win. The result is what the variant would list in full."""
    where = f"variants.{name}"
    if not isinstance(raw, dict) or "extends" not in raw:
        return _config_mapping(raw, where)
    own = dict(raw)
    parent = own.pop("extends")
    if parent not in earlier:
        declared = ", ".join(earlier) or "(none: it is the first variant)"
        raise ConfigError(
            f"{where}.extends={parent!r}: a variant extends one declared before it; declared before: {declared}"
        )
    return {**earlier[parent], **_config_mapping(own, where)}


def _seed_list(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where} must be a non-empty list of non-negative integers, got {raw!r}")
    for s in raw:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"{where}: seed {s!r} is not a non-negative integer")
    if len(set(raw)) != len(raw):
        raise ConfigError(f"{where}: seeds {raw!r} contain duplicates")
    return tuple(raw)


def _n_trials(raw: Any, where: str) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ConfigError(f"{where} must be a positive integer or null, got {raw!r}")
    return raw


def parse_spec(data: dict[str, Any], path: str | None = None) -> StudySpec:
    """Validate the structure of a spec dict (no method registry needed); see :func:`check_configs`."""
    where = path or "study spec"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping at the top level")
    _reject_unknown(data, TOP_LEVEL_KEYS, f"{where} (top level)")
    name = data.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError(f"{where}: `name` must be a word of letters, digits, _ . + - (got {name!r})")
    base = _config_mapping(data.get("base"), "base")

    raw_scales = data.get("scales")
    if not isinstance(raw_scales, dict) or not raw_scales:
        raise ConfigError(f"{where}: `scales` must map scale names (cpu, paper) to config overrides")
    scales, scale_study = {}, {}
    for scale, overrides in raw_scales.items():
        if not isinstance(scale, str) or not NAME_PATTERN.match(scale):
            raise ConfigError(f"{where}: scale name {scale!r} must be a word (e.g. cpu, paper)")
        overrides = dict(overrides or {}) if isinstance(overrides, dict) or overrides is None else overrides
        if not isinstance(overrides, dict):
            raise ConfigError(f"scales.{scale} must be a mapping of config overrides, got {overrides!r}")
        study_part = {k: overrides.pop(k) for k in SCALE_STUDY_KEYS if k in overrides}
        if "seeds" in study_part:
            study_part["seeds"] = _seed_list(study_part["seeds"], f"scales.{scale}.seeds")
        if "n_trials" in study_part:
            study_part["n_trials"] = _n_trials(study_part["n_trials"], f"scales.{scale}.n_trials")
        if "variants" in study_part:
            raw_sv = study_part["variants"]
            if not isinstance(raw_sv, dict):
                raise ConfigError(f"scales.{scale}.variants must map variant names to config overrides")
            study_part["variants"] = {
                str(v): _config_mapping(o, f"scales.{scale}.variants.{v}") for v, o in raw_sv.items()
            }
        scales[scale] = _config_mapping(overrides, f"scales.{scale}")
        scale_study[scale] = study_part
    default_scale = data.get("default_scale") or ("cpu" if "cpu" in scales else next(iter(scales)))
    if default_scale not in scales:
        raise ConfigError(f"default_scale {default_scale!r} is not one of the scales: {', '.join(scales)}")

    variants: dict[str, dict[str, Any]] = {}
    extends: dict[str, str] = {}
    if "variants" in data:
        raw_variants = data["variants"]
        if not isinstance(raw_variants, dict) or not raw_variants:
            raise ConfigError(f"{where}: `variants` must be a non-empty mapping name -> config overrides")
        for vname, overrides in raw_variants.items():
            if not isinstance(vname, str) or not NAME_PATTERN.match(vname):
                raise ConfigError(f"variant name {vname!r} must be a word of letters, digits, _ . + -")
            variants[vname] = _variant_overrides(vname, overrides, variants)
            if isinstance(overrides, dict) and "extends" in overrides:
                extends[vname] = str(overrides["extends"])

    for scale, part in scale_study.items():
        subset = part.get("variant_subset")
        if subset is not None:
            if not isinstance(subset, list) or not subset:
                raise ConfigError(f"scales.{scale}.variant_subset must be a non-empty list of variant names")
            part["variant_subset"] = [str(v) for v in subset]
        unknown = [v for v in [*part.get("variants", {}), *(subset or [])] if v not in variants]
        if unknown:
            valid = ", ".join(variants) or "(the spec has no variants)"
            raise ConfigError(
                f"scales.{scale}.variants names unknown variant {unknown[0]!r}; variants: {valid}"
            )

    dims: list[Dimension] = []
    if "search_space" in data:
        raw_space = data["search_space"]
        if not isinstance(raw_space, dict) or not raw_space:
            raise ConfigError(
                f"{where}: `search_space` is empty; give at least one dimension "
                "(e.g. params.lambda_entropy: {type: float, low: 1.0e-4, high: 1.0, log: true}) or remove it"
            )
        for key, raw in raw_space.items():
            if key in RUNNER_OWNED_KEYS or key == "variant":
                raise ConfigError(f"search_space.{key}: the runner owns this key; it cannot be searched")
            dims.append(parse_dimension(str(key), raw, "search_space"))
        for vname, overrides in variants.items():
            clash = sorted(set(overrides) & {d.key for d in dims})
            if clash:
                raise ConfigError(
                    f"variants.{vname} sets {clash[0]!r}, which is also a search_space dimension; "
                    "the sampled value would silently win: keep it in one place"
                )

    reference = data.get("reference")
    if reference is not None and reference not in variants:
        valid = ", ".join(variants) or "(the spec has no variants)"
        raise ConfigError(f"reference {reference!r} is not a variant; variants: {valid}")

    seeds = _seed_list(data.get("seeds", [0]), "seeds")

    objective = data.get("objective") or {}
    if not isinstance(objective, dict):
        raise ConfigError(f"objective must be a mapping {{metric, direction}}, got {objective!r}")
    _reject_unknown(objective, ("metric", "direction"), "objective")
    metric = objective.get("metric", "final_val_acc")
    if "test" in str(metric):
        raise ConfigError(
            f"objective.metric={metric!r} reads the test split; studies select on validation only: "
            f"choose one of {', '.join(OBJECTIVE_METRICS)}"
        )
    if metric not in OBJECTIVE_METRICS:
        raise ConfigError(
            f"objective.metric={metric!r} is not valid; choose one of {', '.join(OBJECTIVE_METRICS)}"
        )
    direction = objective.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"objective.direction={direction!r} is not valid; choose maximize or minimize")

    sampler = dict(data.get("sampler") or {"name": "grid" if not dims or variants else "tpe"})
    sname = sampler.get("name")
    if sname not in SAMPLERS:
        raise ConfigError(f"sampler.name={sname!r} is not valid; choose one of {', '.join(SAMPLERS)}")
    _reject_unknown(sampler, ("name", *SAMPLER_OPTIONS[sname]), f"sampler ({sname})")
    seed = sampler.setdefault("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"sampler.seed must be a non-negative integer, got {seed!r}")

    pruner = dict(data.get("pruner") or {"name": "none"})
    pname = pruner.get("name")
    if pname not in PRUNERS:
        raise ConfigError(f"pruner.name={pname!r} is not valid; choose one of {', '.join(PRUNERS)}")
    make_pruner(pruner)  # validates the options against the pruner's signature
    if sname in PLANNED_SAMPLERS and pname != "none":
        raise ConfigError(
            f"pruner {pname!r} cannot be used with the {sname} sampler: a planned study runs every "
            "configuration on every seed, and pruning would leave holes; use pruner: {name: none}, or "
            "sampler tpe/random (there only a configuration's first seed can be pruned)"
        )

    n_trials = _n_trials(data.get("n_trials"), "n_trials")
    spec = StudySpec(
        name=name, description=str(data.get("description") or "").strip(), base=base, scales=scales,
        scale_study=scale_study, default_scale=default_scale, variants=variants, search_space=tuple(dims),
        reference=reference, seeds=seeds, objective_metric=metric, direction=direction, sampler=sampler,
        pruner=pruner, n_trials=n_trials, path=path, raw=data, extends=extends,
    )  # fmt: skip
    _check_budget(spec)
    return spec


def _check_budget(spec: StudySpec) -> None:
    for scale in spec.scales:
        n = spec.n_trials_for(scale)
        if spec.sampler_name == "grid":
            if n is not None:
                raise ConfigError(
                    f"n_trials={n} (scale {scale!r}) cannot be set for a grid: the grid is the budget "
                    f"({len(spec._grid_configs(scale))} configurations x {len(spec.seeds_for(scale))} seeds)"
                )
            spec._grid_configs(scale)  # every dimension must be enumerable
        elif n is None:
            raise ConfigError(
                f"sampler {spec.sampler_name!r} needs n_trials (configurations to draw) for scale {scale!r}"
            )
        if spec.sampler_name != "grid" and not spec.search_space and len(spec.variants) < 2:
            raise ConfigError(
                f"sampler {spec.sampler_name!r} has nothing to sample: "
                "add a search_space or use sampler: grid"
            )


def make_pruner(pruner: dict[str, Any]):
    """The Optuna pruner of a spec's ``pruner`` mapping (options checked against its signature)."""
    import inspect

    import optuna

    classes = {
        "none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
    }  # fmt: skip
    cls = classes[pruner["name"]]
    options = {k: v for k, v in pruner.items() if k != "name"}
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    _reject_unknown(options, tuple(valid), f"pruner ({pruner['name']})")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"pruner {pruner['name']!r}: {exc}") from None


def make_sampler(spec: StudySpec):
    """The Optuna sampler. Planned studies (grid/qmc) enqueue every trial with fixed parameters, so their
    sampler never draws; a seeded RandomSampler stands in and is recorded as such."""
    import optuna

    options = {k: v for k, v in spec.sampler.items() if k != "name"}
    if spec.sampler_name == "tpe":
        # Optuna 5's defaults, pinned so that a later default change cannot silently alter a study.
        options.setdefault("multivariate", True)
        options.setdefault("constant_liar", True)
        return optuna.samplers.TPESampler(**options)
    return optuna.samplers.RandomSampler(seed=options.get("seed"))


def check_configs(
    spec: StudySpec, scales: list[str] | None = None, skip_methods: set[str] | frozenset[str] = frozenset()
) -> list[str]:
    """Resolve a representative config of every scale x variant x search-space corner.

    Raises ConfigError for an unknown method (naming where it is used and the registered methods) or any
    config key/value that does not resolve. Configurations of methods in ``skip_methods`` that are not
    registered are skipped; their names are returned (tests use this while methods are being written).
    """
    from cawbench.method import list_methods

    registered = set(list_methods())
    missing = []
    for method, places in spec.methods_used().items():
        if method not in registered:
            if method in skip_methods:
                missing.append(method)
                continue
            raise ConfigError(
                f"study {spec.name!r}: unknown method {method!r} (in {', '.join(places)}); "
                f"registered methods: {', '.join(sorted(registered))}"
            )
    for scale in scales or list(spec.scales):
        for variant in spec.variant_names or [None]:
            for sampled in _corner_points(spec.search_space):
                if spec.method_of(scale, variant, sampled) in missing:
                    continue
                cfg = spec.resolve(scale, variant, sampled, spec.seeds_for(scale)[0])
                if cfg.data.val_size == 0:
                    where = f"scale {scale!r}" + (f", variant {variant!r}" if variant else "")
                    raise ConfigError(
                        f"study {spec.name!r} ({where}): data.val_size=0 leaves no validation split, but the "
                        f"objective {spec.objective_metric} is a validation accuracy (studies never select on "
                        "test); give data.val_size > 0"
                    )
    return sorted(missing)


def _corner_points(dims: tuple[Dimension, ...]) -> list[dict[str, Any]]:
    """All-low, all-high, and every categorical choice with the others at their low end."""
    if not dims:
        return [{}]
    low = {d.key: d.representative_values()[0] for d in dims}
    points = [low, {d.key: d.representative_values()[-1] for d in dims}]
    for d in dims:
        for value in d.representative_values()[1:-1]:
            points.append({**low, d.key: value})
    return points


def find_spec_file(spec: str | Path) -> Path:
    """A path, or a bare name looked up in ./studies and in the project's studies/ folder."""
    path = Path(spec)
    if path.is_file():
        return path
    candidates = []
    if path.suffix == "" and len(path.parts) == 1:
        for folder in (Path.cwd() / "studies", shipped_specs_dir()):
            candidates.append(folder / f"{path.name}.yaml")
        for candidate in candidates:
            if candidate.is_file():
                return candidate
    tried = ", ".join(str(c) for c in [path, *candidates])
    raise ConfigError(f"study spec {str(spec)!r} not found (tried {tried}); `cawbench study list` shows them")


def shipped_specs_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "studies"


def load_spec(
    spec: str | Path, check: bool = True, skip_methods: set[str] | frozenset[str] = frozenset()
) -> StudySpec:
    """Read, validate and (``check``) resolve every configuration of a spec file."""
    path = find_spec_file(spec)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"study spec {str(path)!r} is not valid YAML: {exc}") from None
    try:
        parsed = parse_spec(data, str(path))
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if str(path) in message else f"{path}: {message}") from None
    if check:
        check_configs(parsed, skip_methods=skip_methods)
    return parsed
