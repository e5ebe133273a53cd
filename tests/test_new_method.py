"""A new method is one file: a throw-away method written to a temporary folder and imported declares its
architecture plan, its BP twin, its report label and order, and shows up in `cawbench list`, in a study and
in that study's report with nothing else edited."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from cawbench.archs import ARCHS
from cawbench.cli import main
from cawbench.method import get_method, list_methods, method_report_info, recipes_of, unregister_method

METHOD_FILE = '''\
"""Throw-away: per-layer linear probes on a two-layer MLP plan of its own (a test-only method)."""

import torch.nn.functional as F
from torch import nn

from cawbench.archs import finish_plan, register_arch, scaled, build_plan
from cawbench.method import LocalNetwork, LocalUnit, Method, UnitOutput, register_method


@register_arch("throwaway_mlp")
def throwaway_mlp(cfg, info):
    features = info.in_channels * info.image_size**2
    rows = [dict(kind="linear", in_channels=features, out_channels=scaled(24, cfg.width), kernel=1, padding=0),
            dict(kind="linear", in_channels=scaled(24, cfg.width), out_channels=scaled(16, cfg.width),
                 kernel=1, padding=0)]
    return finish_plan("throwaway_mlp", info, rows)


class ProbeLayer(LocalUnit):
    def __init__(self, n_in, n_out, classes):
        super().__init__()
        self.fc, self.probe = nn.Linear(n_in, n_out), nn.Linear(n_out, classes)

    def forward(self, x):
        h = F.relu(self.fc(x.flatten(1)))
        return UnitOutput(h, self.probe(h))

    def local_losses(self, out, target, ctx):
        return {"ce": F.cross_entropy(out.scores, target)}


@register_method("throwaway")
class Throwaway(Method):
    description = "test-only: per-layer linear probes on its own MLP plan"
    report_label = "Throw-Away"
    report_order = 15  # between CAW-Conv (10) and DeeperForward (20)
    defaults = {"model.arch": "throwaway_mlp", "optim.lr": 0.01}
    recipes = {"paper": {"digits": {"train.epochs": 1}}}
    bp_twin_recipes = {"paper-throwaway": {"digits": {"model.arch": "throwaway_mlp", "train.epochs": 1}}}
    bp_twin = "paper-throwaway"

    def build(self):
        plan = build_plan(self.cfg.model, self.info)
        k = self.info.num_classes
        return LocalNetwork([ProbeLayer(s.in_channels, s.out_channels, k) for s in plan.layers], plan)
'''

SPEC = """\
name: throwaway_study
description: the throw-away method beside its BP twin and a known method
base: {data.name: digits, data.subset: 300, data.val_size: 200, data.test_subset: 200, train.epochs: 1}
scales:
  cpu: {}
variants:
  bp_twin: {method: backprop, recipe: paper-throwaway}
  ff: {method: ff, model.arch: mlp, model.hidden: [32, 32], model.width: 1.0}
  throwaway: {method: throwaway, recipe: paper}
seeds: [0]
objective: {metric: final_val_acc, direction: maximize}
sampler: {name: grid}
pruner: {name: none}
"""


@pytest.fixture
def throwaway(tmp_path):
    """Import the one-file method from a temporary folder; take it and its plan out again afterwards."""
    list_methods()  # the shipped methods first, as any command loads them
    path = tmp_path / "throwaway.py"
    path.write_text(METHOD_FILE)
    spec = importlib.util.spec_from_file_location("throwaway_method", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        yield "throwaway"
    finally:
        unregister_method("throwaway")
        ARCHS.remove("throwaway_mlp")
        sys.modules.pop("throwaway_method", None)


def test_a_one_file_method_is_listed_with_its_plan_and_twin(throwaway, capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert "throwaway" in out and "reported as Throw-Away; BP twin: backprop --recipe paper-throwaway" in out
    assert "paper-throwaway[digits]" in out  # one of backprop's recipes now
    assert main(["list", "archs"]) == 0
    assert "throwaway_mlp" in capsys.readouterr().out
    info = method_report_info(throwaway)
    assert (info.label, info.order, info.bp_twin, info.end_to_end) == (
        "Throw-Away",
        15,
        "paper-throwaway",
        False,
    )
    assert "paper-throwaway" in recipes_of(get_method("backprop"))


def test_a_one_file_method_runs_in_a_study_and_its_report(throwaway, tmp_path, capsys):
    spec = tmp_path / "throwaway_study.yaml"
    spec.write_text(SPEC)
    out_dir = tmp_path / "runs"
    run = ["study", "run", str(spec), "--scale", "cpu", "--out-dir", str(out_dir), "--tracking-uri", "off",
           "--device", "cpu"]  # fmt: skip
    assert main(run) == 0
    report = tmp_path / "report"
    assert main(["report", str(spec), "--out-dir", str(out_dir), "--out", str(report)]) == 0
    capsys.readouterr()
    # declared order, but the reference method's configurations last (backprop's report_order >= TAIL_ORDER)
    assert result_rows(report) == ["ff", "throwaway", "bp_twin"]
    markdown = (report / "README.md").read_text()
    twin = [line for line in markdown.splitlines() if line.startswith("| bp_twin | backprop |")]
    assert twin and "throwaway_mlp" in twin[0]  # the BP twin trained the throw-away method's own plan
    # the same runs as a plain results folder: no declared order, so each method's report_order decides
    folder = tmp_path / "folder_report"
    assert main(["report", str(out_dir), "--out", str(folder)]) == 0
    assert result_rows(folder) == ["throwaway", "ff", "bp_twin"]  # 15 < 60 (ff) < backprop, which sorts last


def result_rows(report: Path) -> list[str]:
    """The configuration column of the report's results table, top to bottom."""
    section = (report / "README.md").read_text().split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    return [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")][1:]
