"""cawbench: a benchmark and ablation suite for forward-only (layer-local) training of CNNs."""

__version__ = "0.1.0"
