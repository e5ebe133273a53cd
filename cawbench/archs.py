"""Architecture plans: the layer list and shortcut wiring, independent of how each layer is trained.

A plan is data (:class:`LayerSpec` rows). Methods turn each row into a local unit; the engine's
:class:`Wiring` applies the residual ops between units on detached tensors; the backprop reference
applies the very same ops inside one end-to-end module. So every method trains the same network.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from cawbench.config import ConfigError, ModelConfig
from cawbench.data import DataInfo
from cawbench.registry import Registry

RESIDUAL_OPS = ("add", "cat", "save", "save_pool")
NORM_POSITIONS = ("pre_act", "post_pool")


@dataclass(frozen=True)
class LayerSpec:
    index: int
    kind: str  # conv | linear
    in_channels: int  # channels (conv) or features (linear) entering the layer
    out_channels: int  # channels/features the layer itself produces (before any concatenation)
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    groups: int = 1
    pool_before: str | None = None  # avg | max: 2x2 pooling of the layer's input
    pool_after: str | None = None  # max: 2x2 pooling after the activation (CwComp, CaFo blocks)
    ops_after: tuple[str, ...] = ()  # residual ops applied to the layer's output, in order
    in_size: int = 1  # spatial size entering the layer (after pool_before)
    out_size: int = 1  # spatial size of the layer's own output
    passed_channels: int = 0  # channels handed to the next layer (after cat)
    # Where the normalisation sits. "pre_act": conv -> norm -> ReLU -> [pool_after] (the default);
    # "post_pool": conv (with bias) -> ReLU -> [pool_after] -> norm (CaFo's blocks, CwComp's layers).
    norm_position: str = "pre_act"
    norm_eps: float = 1e-5  # BatchNorm eps (CaFo and CwComp use 1e-4)
    pool_ceil: bool = True  # 2x2 pools: ceil mode (28 -> 14 -> 7 -> 4); False: floor (7 -> 3), as MaxPool2d
    class_groups: int = 0  # classes competing in this layer's channel groups (CwComp); 0: the dataset's


@dataclass(frozen=True)
class ArchPlan:
    name: str
    input_shape: tuple[int, int, int]
    layers: tuple[LayerSpec, ...]

    def __len__(self) -> int:
        return len(self.layers)

    def describe(self) -> list[dict[str, object]]:
        """One row per layer: input, conv output and passed-on shapes (for docs and tests)."""
        return [
            {
                "layer": s.index,
                "in": (s.in_channels, s.in_size, s.in_size),
                "out": (s.out_channels, s.out_size, s.out_size),
                "passed": (s.passed_channels, s.out_size, s.out_size),
                "stride": s.stride,
                "ops": "+".join(s.ops_after) or "-",
            }
            for s in self.layers
        ]


def _load_method_plans() -> None:
    """Plans that belong to one method are registered by that method's file (methods/cafo.py: cafo_cnn)."""
    importlib.import_module("cawbench.methods")


ArchBuilder = Callable[[ModelConfig, DataInfo], ArchPlan]
ARCHS: Registry[ArchBuilder] = Registry("architecture", loader=_load_method_plans)
register_arch = ARCHS.register


def list_archs(filter: str = "*") -> list[str]:
    return ARCHS.names(filter)


def build_plan(cfg: ModelConfig, info: DataInfo) -> ArchPlan:
    return ARCHS.get(cfg.arch)(cfg, info)


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _pool_out(size: int, ceil: bool = True) -> int:
    """2x2 stride-2 pooling: ceil mode (28 -> 14 -> 7 -> 4) or floor mode (7 -> 3)."""
    return (size + 1) // 2 if ceil else size // 2


def finish_plan(name: str, info: DataInfo, rows: list[dict]) -> ArchPlan:
    """A plan from its rows (:class:`LayerSpec` fields but the computed ones), for plan builders: fill in
    spatial sizes and passed-on channels by walking the plan once; check the wiring adds up."""
    size, channels = info.image_size, info.in_channels
    saved: tuple[int, int] | None = None  # (channels, size) of the shortcut tensor
    layers = []
    for i, row in enumerate(rows):
        spec = LayerSpec(index=i, **row)
        if spec.norm_position not in NORM_POSITIONS:
            raise ConfigError(
                f"{name}: layer {i} has norm_position={spec.norm_position!r}; "
                f"choose one of: {', '.join(NORM_POSITIONS)}"
            )
        if spec.kind == "linear" and i == 0:
            channels = info.in_channels * size * size  # the image enters flattened
        if spec.in_channels != channels:
            raise ConfigError(
                f"{name}: layer {i} expects {spec.in_channels} input channels, receives {channels}"
            )
        if spec.pool_before:
            size = _pool_out(size, spec.pool_ceil)
        in_size = size
        if spec.kind == "conv":
            size = _conv_out(size, spec.kernel, spec.stride, spec.padding)
            if size < 1:
                raise ConfigError(f"{name}: layer {i} output is empty for {info.image_size}px input")
        elif spec.kind == "linear":
            size = 1
        if spec.pool_after:
            size = _pool_out(size, spec.pool_ceil)
            if size < 1:
                raise ConfigError(f"{name}: layer {i} pools to nothing for {info.image_size}px input")
        channels = spec.out_channels
        for op in spec.ops_after:
            if op == "add":
                if saved != (channels, size):
                    raise ConfigError(
                        f"{name}: layer {i} adds a shortcut of {saved} to an output of {(channels, size)}"
                    )
            elif op == "cat":
                if saved is None or saved[1] != size:
                    raise ConfigError(f"{name}: layer {i} concatenates a shortcut of {saved} to size {size}")
                channels += saved[0]
            elif op == "save":
                saved = (channels, size)
            elif op == "save_pool":
                saved = (channels, _pool_out(size))
        layers.append(replace(spec, in_size=in_size, out_size=size, passed_channels=channels))
    return ArchPlan(name, info.input_shape, tuple(layers))


class Wiring:
    """Applies a plan's residual ops between layers (the ResNet-17 shortcut plan)."""

    def __init__(self, plan: ArchPlan) -> None:
        self.ops = [spec.ops_after for spec in plan.layers]

    def apply(
        self, index: int, z: torch.Tensor, shortcut: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        for op in self.ops[index]:
            if op == "add":
                z = z + shortcut
            elif op == "cat":
                z = torch.cat([z, shortcut], dim=1)
            elif op == "save":
                shortcut = z
            elif op == "save_pool":
                shortcut = F.avg_pool2d(z, 2, 2, ceil_mode=True)
        return z, shortcut


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


# --------------------------------------------------------------------------------- ResNet-17
@register_arch("resnet17")
def resnet17(cfg: ModelConfig, info: DataInfo) -> ArchPlan:
    """DeeperForward's ResNet-17 (spec 2(c)): a stem conv and 4 stages of ``depth`` two-layer blocks.

    In each stage the second layer of every block but the last adds the running shortcut S (then S = its
    output); the stage's last layer concatenates S (doubling the channels for the next stage's stride-2
    conv) and S becomes its 2x2 average pool. The final layer does nothing. Depth 2 gives 17 layers.
    Planes are ``base_planes * 2**stage`` times the width (100..800 by default; 200..1600 for
    Tiny-ImageNet; 300..2400 for CHx3).
    """
    depth = cfg.depth or 2
    p0 = scaled(cfg.base_planes or 100, cfg.width)
    planes = [p0 * 2**s for s in range(4)]
    rows: list[dict] = [dict(kind="conv", in_channels=info.in_channels, out_channels=p0, ops_after=("save",))]
    channels = p0
    for stage, p in enumerate(planes):
        for layer in range(2 * depth):
            stride = 2 if stage > 0 and layer == 0 else 1
            ops: tuple[str, ...] = ()
            last_in_stage = layer == 2 * depth - 1
            if layer % 2 == 1 and not last_in_stage:
                ops = ("add", "save")
            elif last_in_stage and stage < 3:
                ops = ("cat", "save_pool")
            rows.append(dict(kind="conv", in_channels=channels, out_channels=p, stride=stride, ops_after=ops))
            channels = 2 * p if "cat" in ops else p
    return finish_plan("resnet17", info, rows)


# --------------------------------------------------------------------------------- VGG and TinyCNN
def _stack(
    name: str, info: DataInfo, blocks: list[list[int]], kernels: list[list[int]] | None = None
) -> ArchPlan:
    rows, channels = [], info.in_channels
    for b, block in enumerate(blocks):
        for j, out in enumerate(block):
            k = kernels[b][j] if kernels else 3
            pool = "avg" if b > 0 and j == 0 else None
            rows.append(
                dict(
                    kind="conv",
                    in_channels=channels,
                    out_channels=out,
                    kernel=k,
                    padding=k // 2,
                    pool_before=pool,
                )
            )
            channels = out
    return finish_plan(name, info, rows)


@register_arch("vgg14")
def vgg14(cfg: ModelConfig, info: DataInfo) -> ArchPlan:
    """DeeperForward's VGG-like net: 70,70 | 140x3 | 280x3 | 560x3 | 560x3, 2x2 avg-pool before blocks 2-5."""
    w = cfg.width
    blocks = [[scaled(70, w)] * 2] + [[scaled(c, w)] * 3 for c in (140, 280, 560, 560)]
    return _stack("vgg14", info, blocks)


@register_arch("vgg13")
def vgg13(cfg: ModelConfig, info: DataInfo) -> ArchPlan:
    """CAW-Conv's released VGG (13 layers): 70,70 | 140x3 | 280x3 | 560x3 | 560,560."""
    w = cfg.width
    blocks = [[scaled(70, w)] * 2] + [[scaled(c, w)] * 3 for c in (140, 280, 560)] + [[scaled(560, w)] * 2]
    return _stack("vgg13", info, blocks)


@register_arch("tinycnn")
def tinycnn(cfg: ModelConfig, info: DataInfo) -> ArchPlan:
    """TinyCNN (4 layers): 5x5 to 100; pool + 5x5 to 200; pool + 3x3 to 400; 3x3 to 400."""
    w = cfg.width
    rows = [
        dict(kind="conv", in_channels=info.in_channels, out_channels=scaled(100, w), kernel=5, padding=2),
        dict(
            kind="conv",
            in_channels=scaled(100, w),
            out_channels=scaled(200, w),
            kernel=5,
            padding=2,
            pool_before="avg",
        ),
        dict(kind="conv", in_channels=scaled(200, w), out_channels=scaled(400, w), pool_before="avg"),
        dict(kind="conv", in_channels=scaled(400, w), out_channels=scaled(400, w)),
    ]
    return finish_plan("tinycnn", info, rows)


@register_arch("mlp")
def mlp(cfg: ModelConfig, info: DataInfo) -> ArchPlan:
    """Fully connected ReLU layers on the flattened image (FF/SymBa); default 4 x 2000 (Hinton)."""
    hidden = cfg.hidden or (2000, 2000, 2000, 2000)
    features = info.in_channels * info.image_size**2
    rows = []
    for h in hidden:
        width = scaled(h, cfg.width)
        rows.append(dict(kind="linear", in_channels=features, out_channels=width, kernel=1, padding=0))
        features = width
    return finish_plan("mlp", info, rows)
