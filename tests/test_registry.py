from __future__ import annotations

import pytest

from cawbench.archs import ARCHS, build_plan
from cawbench.config import ModelConfig
from cawbench.data import DATASETS, DataInfo
from cawbench.method import METHODS, list_methods
from cawbench.readouts import READOUTS
from cawbench.registry import Registry, RegistryError


def test_duplicate_names_are_refused():
    reg: Registry[int] = Registry("widget")
    reg.add("a", 1)
    with pytest.raises(RegistryError, match="widget 'a' is already registered"):
        reg.add("a", 2)


def test_unknown_name_lists_the_valid_ones():
    reg: Registry[int] = Registry("widget")
    reg.add("beta", 2)
    reg.add("alpha", 1)
    with pytest.raises(RegistryError) as err:
        reg.get("gamma")
    assert str(err.value) == "unknown widget 'gamma'; valid widgets: alpha, beta"


def test_names_filter_with_wildcards():
    reg: Registry[int] = Registry("widget")
    for name in ("resnet17", "resnet33", "vgg14"):
        reg.add(name, 0)
    assert reg.names("resnet*") == ["resnet17", "resnet33"]
    assert reg.names("*", exclude="vgg*") == ["resnet17", "resnet33"]


def test_loader_fills_the_registry_once_before_the_first_lookup_and_entries_can_be_removed():
    calls = []
    reg: Registry[int] = Registry("widget", loader=lambda: calls.append(reg.add("late", 1)))
    reg.add("early", 0)  # adding does not load
    assert calls == []
    assert reg.names() == ["early", "late"] and "late" in reg and reg.get("late") == 1
    assert len(calls) == 1
    reg.remove("late")
    assert reg.names() == ["early"]
    with pytest.raises(RegistryError, match="widget 'late' is not registered"):
        reg.remove("late")


def test_method_plans_are_found_without_importing_the_method_first():
    # cafo_cnn is registered by methods/cafo.py; the architecture registry loads the method files itself
    assert "cafo_cnn" in ARCHS.names() and "cwcomp_cnn100" in ARCHS.names()


@pytest.mark.parametrize(
    "registry, expected",
    [
        (DATASETS, {"mnist", "fashion-mnist", "cifar10", "cifar100", "tiny-imagenet", "digits", "synthetic"}),
        (ARCHS, {"resnet17", "vgg14", "tinycnn", "mlp"}),
        (READOUTS, {"last", "sum", "sip", "lcs"}),
    ],
)
def test_core_names_are_registered(registry, expected):
    assert expected <= set(registry.names())


def test_backprop_is_a_registered_method():
    assert "backprop" in list_methods()
    with pytest.raises(RegistryError, match="valid methods: .*backprop"):
        METHODS.get("no-such-method")


@pytest.mark.parametrize("arch", ARCHS.names())
@pytest.mark.parametrize("size", [16, 32])
def test_every_arch_builds_a_consistent_plan(arch, size):
    info = DataInfo("x", num_classes=10, in_channels=1, image_size=size)
    plan = build_plan(ModelConfig(arch=arch, width=0.5), info)
    assert len(plan) >= 1
    for prev, spec in zip(plan.layers, plan.layers[1:]):
        assert spec.in_channels == prev.passed_channels


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_loads_or_says_how_to_get_it(name, tmp_path, monkeypatch):
    from cawbench.config import DataConfig
    from cawbench.data import DataError, prepare_data

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no cached downloads from earlier sessions
    try:
        data = prepare_data(DataConfig(name=name, data_dir=str(tmp_path), subset=20, test_subset=10))
    except DataError as err:
        assert f"could not find the {name} dataset" in str(err) and "--data-dir" in str(err)
        return
    assert data.train.x.dtype.is_floating_point is False and data.train.x.dim() == 4
    assert len(data.train) == 20 and len(data.test) == 10
    assert int(data.train.y.max()) < data.info.num_classes
