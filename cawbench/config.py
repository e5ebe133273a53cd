"""Typed, frozen run configuration: defaults -> method defaults -> recipe -> YAML -> CLI -> overrides.

A run is fully described by a :class:`RunConfig`. It is built from plain nested dicts so that YAML files,
command-line flags and ``key=value`` overrides all go through one validating constructor
(:func:`build_dataclass`): unknown keys are errors that list the valid keys, values are coerced to the
field's type or rejected with the field named, and every section checks its own invariants.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message names it and the valid choices."""


# ------------------------------------------------------------------------------------------ sections
ENGINE_ONLY = "engine_only"  # field metadata key: the field never changes a run's numbers


def engine_only(default: Any) -> Any:
    """A config field that leaves the maths alone (an execution mode with the sequential updates, a time
    limit, where files go, progress display): :meth:`RunConfig.config_hash` leaves it out, so switching it
    keeps a run's hash (and its checkpoint resumable). Methods' ``Config`` fields may use it too."""
    return field(default=default, metadata={ENGINE_ONLY: True})


def hashed_fields(obj: Any) -> Any:
    """``to_plain(obj)`` without the fields marked :func:`engine_only`, at any depth."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: hashed_fields(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not f.metadata.get(ENGINE_ONLY)
        }
    return to_plain(obj)


@dataclass(frozen=True)
class DataConfig:
    name: str = "fashion-mnist"
    # None: $CAWBENCH_DATA, then known system locations, then download
    data_dir: str | None = engine_only(None)
    val_size: float | None = (
        None  # images held out of train for selection; <1 means a fraction; None: default
    )
    split_seed: int = 2222  # fixed across training seeds (paired comparisons); the authors' value
    subset: int | None = None  # use only this many training images (after the split)
    test_subset: int | None = None  # evaluate on only this many test images
    val_subset: int | None = None
    image_size: int | None = None  # None: native size; 32 resizes (F)MNIST as the ResNet recipes do
    normalization: str = "dataset"  # dataset | half | imagenet | none
    augment: str = "none"  # none | crop_flip
    crop_padding: int = 4
    device_resident: bool = True  # keep the dataset on the training device and batch there

    def __post_init__(self) -> None:
        _check_choice("data.normalization", self.normalization, ("dataset", "half", "imagenet", "none"))
        _check_choice("data.augment", self.augment, ("none", "crop_flip"))
        for name in ("subset", "test_subset", "val_subset", "image_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"data.{name} must be a positive integer or null, got {value!r}")
        if self.val_size is not None and not (self.val_size >= 0 and math.isfinite(self.val_size)):
            raise ConfigError(
                f"data.val_size must be >= 0 (a count, or a fraction < 1), got {self.val_size!r}"
            )


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet17"
    width: float = 1.0  # multiplies the architecture's channel counts
    depth: int | None = None  # blocks per stage (ResNet: 2 gives ResNet-17); None: the architecture's default
    base_planes: int | None = None  # first-stage planes before the width multiplier; None: arch default
    hidden: tuple[int, ...] | None = None  # MLP hidden sizes; None: the architecture's default

    def __post_init__(self) -> None:
        if not (self.width > 0 and math.isfinite(self.width)):
            raise ConfigError(
                f"model.width must be a finite number > 0 (1.0 = the paper's widths), got {self.width!r}"
            )
        if self.depth is not None and self.depth < 1:
            raise ConfigError(f"model.depth (blocks per stage) must be >= 1, got {self.depth!r}")
        if self.base_planes is not None and self.base_planes < 1:
            raise ConfigError(f"model.base_planes must be >= 1, got {self.base_planes!r}")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only
    # none | cosine (T_max = epochs, or the reference horizon under train.budget_schedules) | linear_cooldown
    # (FF, loeweX: constant, then linear to 0 over the second half)
    scheduler: str = "none"
    lr_min: float = 0.0
    grad_clip: float | None = None  # global-norm clip per unit

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, ("adam", "adamw", "sgd"))
        _check_choice("optim.scheduler", self.scheduler, ("none", "cosine", "linear_cooldown"))
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optim.lr must be a finite number > 0, got {self.lr!r}")
        if self.weight_decay < 0 or self.lr_min < 0:
            raise ConfigError("optim.weight_decay and optim.lr_min must be >= 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"optim.grad_clip must be > 0 or null, got {self.grad_clip!r}")


@dataclass(frozen=True)
class ReadoutConfig:
    name: str = "last"  # see `cawbench list`: last, sum, sip, lcs, softmax_sum, ...
    extra: tuple[str, ...] = ()  # further readouts evaluated and recorded beside the main one
    sum_range: tuple[int, int] | None = None  # layers (inclusive, 0-based) for `sum`; None: all
    lcs_signal: str = "train"  # train: epoch-mean training CE per layer (authors' code) | val: held-out CE
    lcs_temperature: float = 1.0
    sip_initial: tuple[int, int] = (1, -1)  # range used before the first selection (-1 = last layer)

    def __post_init__(self) -> None:
        _check_choice("readout.lcs_signal", self.lcs_signal, ("train", "val"))
        if not self.lcs_temperature > 0:
            raise ConfigError(f"readout.lcs_temperature must be > 0, got {self.lcs_temperature!r}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 512
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere | fp32 | bf16
    channels_last: bool = True  # on CUDA only
    compile: bool = False  # torch.compile each unit
    parallel: str = "off"  # off | pipeline | streams (layer-parallel modes, same maths as sequential)
    pipeline_threads: int = engine_only(1)  # CPU pipeline: >1 = that many single-threaded workers over groups
    cuda_graph: bool = engine_only(False)  # CUDA only: capture the whole training step once per epoch, replay
    fused_optimizer: bool = engine_only(True)  # fused Adam/AdamW/SGD kernels where torch has them (CPU too)
    # How the units of a step update (cawbench.updates): none = each right after its backward | steps = all
    # at once (one clipping pass, one optimiser call per optimiser kind, one stats update; bit for bit none
    # on the CPU) | all = steps + the loss pieces a method computes for all its units together (equal maths,
    # float rounding of batched sums aside). Not hashed: an execution mode with the sequential maths.
    merge_units: str = engine_only("all")
    # stop after the epoch that would overrun this; the row is marked truncated (and can be resumed)
    time_limit_s: float | None = engine_only(None)
    # Drive every epoch-indexed schedule (LR, temperature decay, ortho warm-up, CwComp's layer windows) by
    # training progress mapped onto the reference horizon, updated every step: a 3-epoch run passes through
    # the phases of the 150-epoch recipe. Off: the released per-epoch schedules over this run's epochs.
    budget_schedules: bool = False
    schedule_epochs: int | None = (
        None  # reference horizon; None: the recipe's train.epochs, else train.epochs
    )
    eval_test_every_epoch: bool = True  # needed for the best-epoch columns
    checkpoint: bool = engine_only(True)
    progress: bool = engine_only(True)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.seed < 0:
            raise ConfigError(f"train.seed must be >= 0, got {self.seed!r}")
        _check_choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        _check_choice("train.parallel", self.parallel, ("off", "pipeline", "streams"))
        _check_choice("train.merge_units", self.merge_units, ("none", "steps", "all"))
        if self.pipeline_threads < 1:
            raise ConfigError(f"train.pipeline_threads must be >= 1, got {self.pipeline_threads!r}")
        if self.schedule_epochs is not None and self.schedule_epochs < 1:
            raise ConfigError(f"train.schedule_epochs must be >= 1 or null, got {self.schedule_epochs!r}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ConfigError(f"train.time_limit_s must be > 0 or null, got {self.time_limit_s!r}")


#: Switches that are gone but were hashed, with the value every run now has: hashed as before, so the
#: hashes (checkpoints, run names) of configurations made before their removal stay valid.
#: ``train.fast_dropout`` (on by default): dropout is now always the channel-wise layer's bulk-drawn kind.
RETIRED_HASHED: dict[str, dict[str, Any]] = {"train": {"fast_dropout": True}}


@dataclass(frozen=True)
class EmptyParams:
    """Methods without hyperparameters of their own."""


@dataclass(frozen=True)
class RunConfig:
    method: str = "backprop"
    variant: str = "base"  # free label carried into results (e.g. an ablation variant's name)
    recipe: str = "default"  # default | paper (the authors' recipe for the dataset)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    readout: ReadoutConfig = field(default_factory=ReadoutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    params: Any = field(default_factory=EmptyParams)  # the method's own frozen dataclass
    out_dir: str = engine_only("runs")
    run_name: str | None = engine_only(None)

    def __post_init__(self) -> None:
        if self.run_name is not None:
            check_run_name(self.run_name)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def config_hash(self) -> str:
        """Hash of everything that can change the numbers: every field but those marked :func:`engine_only`
        (how the run executes, where it writes, how progress shows)."""
        d = hashed_fields(self)
        for section, retired in RETIRED_HASHED.items():
            d[section].update(retired)
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def replace(self, **overrides: Any) -> RunConfig:
        """A copy with dotted-key overrides, validated like a fresh config."""
        nested = self.to_dict()
        for key, value in overrides.items():
            set_dotted(nested, key, value)
        return build_run_config(nested, type(self.params))


# ------------------------------------------------------------------------------------------ helpers
def check_run_name(name: str) -> None:
    """A run name is a folder path under OUT_DIR/runs: relative, without ``..`` or empty parts (studies
    use ``<study>/<trial>``), so that a run never writes outside its --out-dir."""
    parts = name.replace("\\", "/").split("/")
    if not name.strip() or name.startswith(("/", "~")) or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(
            f"run_name={name!r} must be a relative folder path under OUT_DIR/runs (parts joined by '/', none "
            "empty, '.' or '..'; no leading '/' or '~'), so that the run stays inside --out-dir"
        )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(choices)}")


def to_plain(obj: Any) -> Any:
    """Dataclasses/tuples -> dicts/lists, recursively (YAML- and JSON-friendly)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def set_dotted(nested: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = nested
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.01"`` -> ``("optim.lr", 0.01)``; values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like KEY=VALUE (e.g. optim.lr=0.01)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse value: {exc}") from None
    return key, value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce a YAML/CLI value to a field type, or raise ConfigError naming the field."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} expects a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where} expects {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} expects a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} expects an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ConfigError(f"{where} expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} expects a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} expects a mapping of {tp.__name__} fields, got {value!r}")
        return build_dataclass(tp, value, where)
    return value


def build_dataclass(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Construct ``cls`` from a dict, rejecting unknown keys and coercing every field."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!r}"
            + (f" (section {where!r})" if where else "")
            + f"; valid keys: {', '.join(names) if names else '(none)'}"
        )
    kwargs = {}
    for name in names:
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def build_run_config(nested: dict[str, Any], params_cls: type) -> RunConfig:
    nested = dict(nested)
    params = nested.pop("params", {}) or {}
    cfg = build_dataclass(RunConfig, nested)
    return dataclasses.replace(cfg, params=build_dataclass(params_cls, params, "params"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"config file {str(path)!r} is not a text (YAML) file; give a .yaml config"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def save_yaml(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
