"""studies/caw_ablation.yaml: every variant resolves at every scale; the ladder adds one component per rung
and ends at caw_conv; each "minus" variant differs from caw_conv in the component it names."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cawbench.config import flatten
from cawbench.studies.spec import load_spec

SPEC_PATH = Path(__file__).resolve().parents[1] / "studies" / "caw_ablation.yaml"
SPEC = yaml.safe_load(SPEC_PATH.read_text())
STUDY = load_spec(SPEC_PATH)  # the study runner's own parser and validation (resolves every configuration)
LADDER = ["deeperforward"] + sorted(v for v in SPEC["variants"] if v.startswith("ladder"))
#: what may differ between runs of one configuration without changing its training
LABELS = {"method", "variant"}


def resolve(variant: str, scale: str):
    """A trial's config as the study runner builds it: base -> variant label -> scale -> variant overrides."""
    return STUDY.resolve(scale, variant, {}, seed=0)


def flat(cfg) -> dict:
    return {k: v for k, v in flatten(cfg.to_dict()).items() if k not in LABELS}


EXPLICIT = Path(__file__).resolve().parent / "data" / "caw_ablation_explicit.yaml"


@pytest.mark.parametrize("scale", ["cpu", "paper"])
def test_ladder_written_with_extends_resolves_to_the_configurations_written_out_in_full(scale):
    """tests/data/caw_ablation_explicit.yaml is the spec as it was before `extends:` (every rung listing
    every key): the same configurations, so the same study fingerprint (a re-run resumes that study)."""
    explicit = load_spec(EXPLICIT)
    assert STUDY.variants == explicit.variants
    assert STUDY.fingerprint(scale) == explicit.fingerprint(scale)
    for variant in explicit.variants:
        now, before = resolve(variant, scale), explicit.resolve(scale, variant, {}, seed=0)
        assert now.to_dict() == before.to_dict() and now.config_hash() == before.config_hash(), variant


def test_spec_has_the_schema_keys_and_its_reference_is_a_variant():
    assert set(SPEC) == {"name", "description", "base", "scales", "variants", "reference", "seeds",
                         "objective", "sampler", "pruner"}  # fmt: skip
    assert SPEC["name"] == "caw_ablation" and SPEC["reference"] in SPEC["variants"]
    assert SPEC["objective"]["metric"].endswith("val_acc")  # model selection never sees test


@pytest.mark.parametrize("scale", ["cpu", "paper"])
def test_every_variant_resolves_to_a_valid_config(scale):
    for variant, overrides in STUDY.variants.items():  # extends: applied
        cfg = resolve(variant, scale)
        assert cfg.variant == variant
        assert cfg.method == overrides.get("method", SPEC["base"]["method"])
        assert cfg.data.name == "fashion-mnist" and cfg.recipe == "paper"
        at_scale = {**STUDY.scales[scale], **STUDY.scale_study[scale].get("variants", {}).get(variant, {})}
        for key, value in at_scale.items():  # the scale's config keys (and its per-variant ones) reach it
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value, (variant, key, node, value)
        if scale == "paper":
            assert cfg.train.epochs == 150 and cfg.data.val_size == 10_000


def test_ladder_adds_one_component_per_rung_and_ends_at_caw_conv():
    caw = flat(resolve("caw_conv", "paper"))
    previous = flat(resolve("deeperforward", "paper"))
    assert len(LADDER) == 13
    for before, rung in zip(LADDER, LADDER[1:], strict=False):
        assert SPEC["variants"][rung]["extends"] == before, f"{rung} must extend the rung before it"
        overrides, earlier = STUDY.variants[rung], STUDY.variants[before]
        assert set(earlier).issubset(overrides), f"{rung} drops a component of {before}"
        current = flat(resolve(rung, "paper"))
        changed = {k for k in current if current[k] != previous[k]}
        assert changed, f"{rung} changes nothing"
        assert all(current[k] == caw[k] for k in changed), f"{rung} moves away from caw_conv: {changed}"
        previous = current
    assert previous == caw, {k: (previous[k], caw[k]) for k in caw if previous[k] != caw[k]}


MINUS = {
    "minus_entropy": {"params.lambda_entropy"},
    "minus_ortho": {"params.lambda_ortho"},
    "minus_entropy_ortho": {"params.lambda_entropy", "params.lambda_ortho"},
    "minus_learnable_assignment": {"params.assignment"},
    "minus_mix_pooling": {"params.pooling"},
    "minus_instance_norm": {"params.norm"},
    "minus_label_smoothing": {"params.label_smoothing"},
    "minus_grad_clip": {"optim.grad_clip"},
    "minus_lcs": {"readout.name"},
}


def test_each_minus_variant_switches_off_exactly_its_component():
    caw = flat(resolve("caw_conv", "paper"))
    assert set(MINUS) == {v for v in SPEC["variants"] if v.startswith("minus_")}
    for variant, keys in MINUS.items():
        cfg = flat(resolve(variant, "paper"))
        assert {k for k in cfg if cfg[k] != caw[k]} == keys, variant


def test_references_use_their_own_paper_recipes():
    df = resolve("deeperforward", "paper")
    assert df.params.assignment == "fixed" and df.readout.name == "sip" and df.optim.lr_min == 0.008
    bp = resolve("backprop", "cpu")
    assert bp.method == "backprop" and bp.model.width == 0.1 and bp.model.arch == "resnet17"
