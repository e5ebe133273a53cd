"""Reports: aggregation against hand computations, a rendered report of a finished digits study, and a
clear error for a study with no finished trials."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cawbench.reporting.aggregate import MISSING, aggregate, cells, format_cell, markdown_table, pivot_cells

#: two-sided 95 % Student-t quantiles t(0.975, df) as printed in statistics tables, df = 1, 2, 3
T_975 = {1: 12.706204736174707, 2: 4.302652729911275, 3: 3.182446305284263}


# ------------------------------------------------------------------------------------------ aggregation
def small_table() -> pd.DataFrame:
    rows = [
        # (variant, dataset, seed, final_test_acc)
        ("full", "mnist", 0, 90.0), ("full", "mnist", 1, 92.0), ("full", "mnist", 2, 94.0),
        ("minus_h", "mnist", 0, 89.0), ("minus_h", "mnist", 1, 92.5), ("minus_h", "mnist", 2, 93.0),
        ("minus_o", "mnist", 0, 80.0), ("minus_o", "mnist", 1, 85.0),  # seed 2 never finished
        ("lonely", "mnist", 5, 70.0),  # a seed the reference never ran: no pair
        ("full", "cifar10", 0, 60.0),  # one run: no spread
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["variant", "dataset", "seed", "final_test_acc"])


def test_aggregate_equals_hand_computation():
    agg = aggregate(small_table(), ["dataset", "variant"], "final_test_acc").set_index(["dataset", "variant"])
    full = agg.loc[("mnist", "full")]
    assert full["mean"] == pytest.approx(92.0)
    assert full["std"] == pytest.approx(2.0)  # sqrt(((-2)^2 + 0 + 2^2) / (3 - 1)): ddof=1
    assert full["n"] == 3
    minus_h = agg.loc[("mnist", "minus_h")]
    assert minus_h["mean"] == pytest.approx((89.0 + 92.5 + 93.0) / 3)
    assert minus_h["std"] == pytest.approx(np.std([89.0, 92.5, 93.0], ddof=1))
    minus_o = agg.loc[("mnist", "minus_o")]
    assert (minus_o["mean"], minus_o["n"]) == (pytest.approx(82.5), 2)
    assert minus_o["std"] == pytest.approx(math.sqrt(12.5))  # (2.5^2 * 2) / 1
    single = agg.loc[("cifar10", "full")]
    assert single["n"] == 1 and math.isnan(single["std"])

    text = cells(agg.reset_index()).tolist()
    assert text[0] == "92.00 ± 2.00 (3)"
    assert "82.50 ± 3.54 (2)" in text
    assert "60.00 (1)" in text  # n = 1: no ±


def test_paired_effects_equal_hand_computed_t_intervals():
    from cawbench.reporting.stats import effect_cells, paired_effects

    against = {"minus_h": "full", "minus_o": "full", "lonely": "full"}
    effects = paired_effects(small_table(), ["dataset"], "variant", against, "final_test_acc")
    e = effects.set_index(["dataset", "variant"])
    # minus_h - full per seed: -1.0, +0.5, -1.0: mean -0.5, sd sqrt(0.75), n 3
    half = T_975[2] * math.sqrt(0.75) / math.sqrt(3)
    assert e.loc[("mnist", "minus_h"), "mean"] == pytest.approx(-0.5)
    assert (e.loc[("mnist", "minus_h"), "low"], e.loc[("mnist", "minus_h"), "high"]) == (
        pytest.approx(-0.5 - half), pytest.approx(-0.5 + half))  # fmt: skip
    assert e.loc[("mnist", "minus_h"), "n"] == 3 and not e.loc[("mnist", "minus_h"), "resolved"]
    # minus_o: seeds 0 and 1 only: -10, -7: mean -8.5, sd sqrt(4.5), n 2
    half_o = T_975[1] * math.sqrt(4.5) / math.sqrt(2)
    assert e.loc[("mnist", "minus_o"), "high"] == pytest.approx(-8.5 + half_o)
    assert e.loc[("mnist", "minus_o"), "n"] == 2
    assert e.loc[("mnist", "lonely"), "n"] == 0  # no common seed: no difference, not zero
    shown = dict(zip(effects["variant"], effect_cells(effects)))
    assert shown["minus_h"] == f"-0.50 [{-0.5 - half:+.2f}, {-0.5 + half:+.2f}] (3), not resolved"
    assert shown["minus_o"] == f"-8.50 [{-8.5 - half_o:+.2f}, {-8.5 + half_o:+.2f}] (2), not resolved"
    assert shown["lonely"] == MISSING


def test_t_interval_resolves_only_when_it_excludes_zero():
    from cawbench.reporting.stats import format_effect, t_interval

    clear = t_interval([1.0, 1.2, 0.8, 1.1])  # mean 1.025, sd 0.17078, n 4: [0.753, 1.297]
    assert clear.resolved and clear.low == pytest.approx(1.025 - T_975[3] * 0.1707825 / 2, abs=1e-5)
    assert format_effect(clear) == "+1.02 [+0.75, +1.30] (4)"
    one = t_interval([3.0])
    assert not one.resolved and format_effect(one) == "+3.00 (1), not resolved"  # no interval from one seed
    assert not t_interval([-1.0, 1.0, 0.5]).resolved
    assert format_effect(t_interval([])) == MISSING


def test_spreads_compare_configurations_with_seeds():
    from cawbench.reporting.stats import spreads

    rows = pd.DataFrame({"config": ["a", "a", "b", "b"], "v": [1.0, 3.0, 5.0, 7.0]})
    s = spreads(rows, "config", "v")  # within: var 2 each -> sd sqrt(2); means 2, 6 -> sd sqrt(8)
    assert (s.seed_sd, s.config_sd, s.n_configs) == (
        pytest.approx(math.sqrt(2)),
        pytest.approx(math.sqrt(8)),
        2,
    )
    assert s.informative
    noisy = spreads(pd.DataFrame({"config": ["a", "a", "b", "b"], "v": [1.0, 9.0, 2.0, 8.0]}), "config", "v")
    assert not noisy.informative and "against seed spread" in noisy.describe("v")
    single = spreads(pd.DataFrame({"config": ["a", "b", "c"], "v": [1.0, 5.0, 9.0]}), "config", "v")
    assert math.isnan(single.seed_sd) and not single.informative  # one seed each: noise unknown
    assert "unknown (no configuration ran on 2 or more seeds)" in single.describe("v")


def test_pairing_refuses_ambiguous_seeds():
    from cawbench.reporting.stats import paired_effects

    table = pd.concat([small_table(), small_table().iloc[[0]]])  # full/mnist/seed 0 twice
    with pytest.raises(ValueError, match="several runs share"):
        paired_effects(table, ["dataset"], "variant", {"minus_h": "full"}, "final_test_acc")


def test_ladder_rungs_build_on_extends_else_the_variant_before():
    from types import SimpleNamespace

    from cawbench.reporting.source import predecessors

    variants = {"caw_conv": {}, "deeperforward": {}, "ladder01_a": {}, "ladder02_b": {}, "ladder03_c": {},
                "minus_x": {}}  # fmt: skip
    raw = {"variants": {"ladder03_c": {"extends": "ladder01_a"}}}
    spec = SimpleNamespace(variants=variants, raw=raw)
    assert predecessors(spec) == {"ladder01_a": "deeperforward", "ladder02_b": "ladder01_a",
                                  "ladder03_c": "ladder01_a"}  # fmt: skip
    parsed = SimpleNamespace(variants=variants, raw={}, extends={"minus_x": "caw_conv"})
    assert predecessors(parsed)["minus_x"] == "caw_conv"


def test_missing_cells_render_as_dash_never_zero():
    agg = aggregate(small_table(), ["dataset", "variant"], "final_test_acc")
    agg["cell"] = cells(agg)
    grid = pivot_cells(agg, "variant", "dataset", "cell", ["full", "minus_h", "minus_o", "lonely"])
    assert grid.loc["minus_h", "cifar10"] == MISSING
    assert grid.loc["full", "cifar10"] == "60.00 (1)"
    text = markdown_table(grid, index=True)
    assert "| minus_h | – | 91.50 ± 2.18 (3) |" in text
    assert format_cell(float("nan"), 1.0, 3) == MISSING and format_cell(50.0, None, 0) == MISSING
    assert markdown_table(pd.DataFrame({"a": [None, 1.5]})).splitlines()[2:] == ["| – |", "| 1.50 |"]
    assert " 0.00 " not in text


# ------------------------------------------------------------------------------------------ a study
SPEC = """\
name: digits_report
description: Tiny digits study that the report tests render.
base:
  method: backprop
  data.name: digits
  data.subset: 300
  model.arch: mlp
  model.hidden: [32, 32]
  optim.lr: 0.01
  train.epochs: 2
  readout.extra: [lcs]
scales:
  cpu: {}
variants:
  full: {}
  smooth: {params.label_smoothing: 0.2}
search_space:
  model.width: {type: categorical, choices: [0.5, 1.0]}
reference: full
seeds: [0, 1]
objective: {metric: final_val_acc, direction: maximize}
sampler: {name: grid}
pruner: {name: none}
"""

PAPER = """\
method,architecture,dataset,variant,top1_accuracy_pct,std_pct,note
Backprop,MLP,digits,base,97.50,0.50,made-up row for the test
CAW-Conv,ResNet-17,CIFAR-10,base,89.37,,no run of ours
"""


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """Run the digits study (8 trials: 2 variants x 2 widths x 2 seeds) with the real runner."""
    from cawbench.studies.runner import RunOptions, run_study
    from cawbench.studies.spec import load_spec

    root = tmp_path_factory.mktemp("study")
    spec_path = root / "digits_report.yaml"
    spec_path.write_text(SPEC)
    out_dir = root / "runs"
    opts = RunOptions(
        spec=load_spec(spec_path), out_dir=out_dir, tracking_uri="off", echo_progress=False, device="cpu"
    )
    summary = run_study(opts)
    assert summary["counts"] == {"COMPLETE": 8}
    # Assignment artifacts as CAW-Conv writes them (C x K, rows summing to 1) for one run per variant.
    rng = np.random.default_rng(0)
    for row in pd.read_json(out_dir / "results.jsonl", lines=True).itertuples():
        if row.seed == 0:
            arrays = {}
            for layer, channels in ((0, 12), (1, 16), (2, 20)):
                logits = rng.normal(size=(channels, 10))
                arrays[f"layer{layer:02d}_assignment"] = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            np.savez(Path(row.run_dir) / "artifacts.npz", **arrays)
    paper = root / "paper_results.csv"
    paper.write_text(PAPER)
    return spec_path, out_dir, paper


def _markdown_rows(markdown: str, section: str, marker: str = "") -> list[list[str]]:
    """The body rows of the first table under ``## section`` (after ``marker`` within it)."""
    body = markdown.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    body = body.split(marker, 1)[1] if marker else body
    lines = []
    for line in body.lstrip().splitlines():
        if not line.startswith("|"):
            if lines:
                break
            continue
        lines.append(line)
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[2:]]


def _hand_best_runs(results: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per variant, the runs of the configuration with the best mean validation accuracy."""
    out = {}
    for variant, runs in results.groupby("study_variant"):
        means = runs.groupby("config_id")["final_val_acc"].mean()
        out[variant] = runs[runs["config_id"] == means.idxmax()]
    return out


def test_report_of_finished_study(finished_study, tmp_path, capsys):
    from cawbench.cli import main

    spec_path, out_dir, paper = finished_study
    out = tmp_path / "report"
    argv = ["report", str(spec_path), "--out-dir", str(out_dir), "--out", str(out),
            "--paper-results", str(paper)]  # fmt: skip
    assert main(argv) == 0
    assert f"report written to {out / 'README.md'}" in capsys.readouterr().out
    markdown = (out / "README.md").read_text()

    tables = ["results", "paper_comparison", "ablation", "configurations", "cost", "runs", "spreads",
              "depth_width", "depth_width_effects", "learning_curves_digits"]  # fmt: skip
    for name in tables:
        assert (out / "tables" / f"{name}.csv").stat().st_size > 0, name
    assert r"\begin{tabular}" in (out / "tables" / "paper_comparison.tex").read_text()
    figures = ["sensitivity", "parallel_coordinate", "depth_width_full_digits_mlp", "depth_width_smooth_digits_mlp",
               "learning_curves_digits", "assignment_digits"]  # fmt: skip
    for name in figures:
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        assert f"](figures/{name}.png)" in markdown, name
    assert sorted(p.stem for p in (out / "figures").iterdir()) == sorted(figures)
    # One MLP unit per run: per-layer views say why they are left out instead of drawing one point.
    assert "Per-layer accuracy: no run has per-layer accuracy of two or more scoring units" in markdown

    # The header says how, where and with what the report was made.
    for needle in ("**Command:** `cawbench report", "**Hardware (runs):** cpu", "**Date:**",
                   "optuna 5", f"`{out_dir / 'optuna.journal'}`", "ddof=1", "**Code (runs):** git `"):  # fmt: skip
        assert needle in markdown, needle
    # Two widths x two seeds: the spread check decides whether importance may be shown, and says why.
    spread = pd.read_csv(out / "tables" / "spreads.csv").iloc[0]
    results = pd.read_json(out_dir / "results.jsonl", lines=True)
    per_config = results.groupby("config_id")["final_val_acc"]
    assert spread["configuration_sd"] == pytest.approx(per_config.mean().std(ddof=1))
    assert spread["seed_sd"] == pytest.approx(math.sqrt(per_config.var(ddof=1).mean()))
    assert bool(spread["informative"]) == (spread["configuration_sd"] > spread["seed_sd"])
    assert f"configuration spread {spread['configuration_sd']:.2f} points" in markdown
    assert ("PED-ANOVA" in markdown) == bool(spread["informative"])

    # The numbers in the Markdown equal a hand aggregation of the results table.
    best = _hand_best_runs(results)
    shown = {r[0]: r for r in _markdown_rows(markdown, "Results")}
    assert set(shown) == {"full", "smooth"}
    for variant, runs in best.items():
        acc = runs["final_test_acc"]
        expected = f"{acc.mean():.2f} ± {acc.std(ddof=1):.2f} ({len(acc)})"
        assert shown[variant][4] == expected, (variant, shown[variant])
    ablation = _markdown_rows(markdown, "Ablation")
    assert [r[0] for r in ablation] == ["full", "smooth"]  # the reference first
    ref = best["full"].set_index("seed")["final_test_acc"]
    diffs = best["smooth"].set_index("seed")["final_test_acc"] - ref
    half = T_975[1] * diffs.std(ddof=1) / math.sqrt(2)
    low, high = diffs.mean() - half, diffs.mean() + half
    expected = f"{diffs.mean():+.2f} [{low:+.2f}, {high:+.2f}] (2)"
    assert ablation[0][3] == "reference"
    assert ablation[1][3] == expected + ("" if low > 0 or high < 0 else ", not resolved")

    # Paper rows: ours beside the published number; rows we did not run show "–", not zero.
    paper_rows = {r[0]: r for r in _markdown_rows(markdown, "Paper comparison")}
    bp = paper_rows["Backprop"]
    assert bp[4] == "97.50 ± 0.50"
    assert "ours (cpu scale): final-epoch test (choices on validation)" in markdown
    ours = pd.concat(best.values())
    ours = ours[ours["study_variant"] == "full"]["final_test_acc"]
    assert bp[5] == f"{ours.mean():.2f} ± {ours.std(ddof=1):.2f} (2)"
    assert bp[6] == f"{ours.mean() - 97.5:+.2f}"
    assert paper_rows["CAW-Conv"][5:9] == [MISSING] * 4
    assert "best-epoch test (max over epochs)" in markdown

    # Depth x width: the means in the heatmap table equal the hand means of each width.
    full = results[results["study_variant"] == "full"]
    heat = _markdown_rows(markdown, "Depth x width", "**full on digits (mlp)**")
    for width, cell in zip((0.5, 1.0), heat[0][1:]):
        acc = full[full["width"] == width]["final_test_acc"]
        assert cell == f"{acc.mean():.2f} ± {acc.std(ddof=1):.2f} (2)"
    # ... and each other cell against the paper's network (default depth, width 1), paired per seed.
    effects = {r[0]: r for r in _markdown_rows(markdown, "Depth x width", "Each cell against the paper's")}
    by_width = full.set_index(["width", "seed"])["final_test_acc"]
    diffs = by_width[0.5] - by_width[1.0]
    half = T_975[1] * diffs.std(ddof=1) / math.sqrt(2)
    low, high = diffs.mean() - half, diffs.mean() + half
    expected = f"{diffs.mean():+.2f} [{low:+.2f}, {high:+.2f}] (2)" + (
        "" if low > 0 or high < 0 else ", not resolved"
    )
    assert effects["full"][3:] == ["depth default, width 0.5", "depth default, width 1", expected]
    assert set(effects) == {"full", "smooth"}


def test_results_folder_report(finished_study, tmp_path):
    """A plain results folder (no study) still gives the results table; study-only sections say why."""
    from cawbench.reporting.report import _Builder
    from cawbench.reporting.source import load_source

    _, out_dir, paper = finished_study
    source = load_source(str(out_dir))
    assert source.study is None and len(source.rows) == 8 and source.origin == "results folder"
    builder = _Builder(source, tmp_path / "plain", "test", paper, [], None)
    builder.results()
    builder.importance(informative=True)
    builder.history()
    assert (
        builder.report.omitted["importance"]
        == "Parameter importance: the runs do not come from an Optuna study"
    )
    assert "Optuna study" in builder.report.omitted["history"]
    assert builder.report.tables["results"]["final_test_acc_n"].tolist() == [2, 2]


def test_a_malformed_results_line_is_named_and_skipped(finished_study, tmp_path, capsys):
    """A torn or hand-broken line of results.jsonl: the report names file and line and reads the rest."""
    from cawbench.reporting.source import load_source

    _, out_dir, _ = finished_study
    folder = tmp_path / "torn"
    folder.mkdir()
    lines = (out_dir / "results.jsonl").read_text().splitlines()
    (folder / "results.jsonl").write_text("\n".join([lines[0], '{"method": "backp', *lines[1:]]) + "\n")
    source = load_source(str(folder))
    assert len(source.rows) == 8
    err = capsys.readouterr().err
    assert f"cawbench: warning: {folder / 'results.jsonl'}, line 2: not valid JSON" in err


def test_study_without_finished_trials_gives_a_clear_message(tmp_path, capsys):
    from cawbench.cli import main
    from cawbench.studies.runner import RunOptions, prepare
    from cawbench.studies.spec import load_spec

    spec_path = tmp_path / "digits_report.yaml"
    spec_path.write_text(SPEC)
    out_dir = tmp_path / "runs"
    prepare(RunOptions(spec=load_spec(spec_path), out_dir=out_dir, tracking_uri="off", echo_progress=False))
    out = tmp_path / "report"
    assert main(["report", str(spec_path), "--out-dir", str(out_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "digits_report-cpu" in err and "no finished trials" in err and "waiting 8" in err
    assert "cawbench study run" in err
    assert not out.exists()  # no empty report

    # A study that was never started, and a name that is nothing at all, are clear errors too.
    assert main(["report", "no_such_study", "--out-dir", str(out_dir)]) == 2
    assert "'no_such_study' is not a study spec, study name or results folder" in capsys.readouterr().err


def test_best_configuration_is_chosen_on_validation_over_full_seed_sets():
    from cawbench.reporting.source import best_configs

    rows = pd.DataFrame(
        [
            # config, seed, final_val_acc, final_test_acc
            ("a", 0, 80.0, 99.0), ("a", 1, 82.0, 99.0),  # the best test accuracy: must not matter
            ("b", 0, 85.0, 50.0), ("b", 1, 83.0, 50.0),  # best mean validation over both seeds
            ("c", 0, 95.0, 10.0),  # one lucky seed only: not comparable to the full ones
        ],
        columns=["config", "seed", "final_val_acc", "final_test_acc"],
    ).assign(label="x")  # fmt: skip
    chosen = best_configs(rows, ["label"], "final_val_acc", "maximize")
    assert set(chosen["config"]) == {"b"} and len(chosen) == 2
    assert set(best_configs(rows, ["label"], "final_val_acc", "minimize")["config"]) == {"a"}


def test_paper_rows_match_method_dataset_and_chx3():
    from cawbench.reporting.paper import matching_runs

    rows = pd.DataFrame(
        [
            # label, method, dataset, width, depth_label
            ("caw_conv", "caw_conv", "cifar100", 1.0, "default"),
            ("caw_conv", "caw_conv", "cifar100", 1.0, "1"),
            ("caw_conv", "caw_conv", "cifar100", 3.0, "default"),
            ("caw_conv", "caw_conv", "cifar10", 1.0, "default"),
            ("deeperforward", "deeperforward", "cifar100", 1.0, "default"),
        ],
        columns=["label", "method", "dataset", "width", "depth_label"],
    )  # fmt: skip
    base = pd.Series({"method": "CAW-Conv", "dataset": "CIFAR-100", "variant": "base"})
    chx3 = pd.Series({"method": "CAW-Conv", "dataset": "CIFAR-100", "variant": "CHx3"})
    assert matching_runs(rows, base, None).index.tolist() == [0]  # the paper's width and default depth
    assert matching_runs(rows, chx3, None).index.tolist() == [2]
    other = pd.Series({"method": "CwComp", "dataset": "CIFAR-100", "variant": "base"})
    assert matching_runs(rows, other, None).empty


@pytest.mark.parametrize(
    ("test_epochs", "expected"),
    [
        ([1, 1, 1], True),  # eval_test_every_epoch: false, every run tested once
        ([1, 6, 1], False),  # one run tested every epoch: its best-epoch columns mean something
        ([1, None, 1], False),  # a run without metrics: not known, keep the columns
        ([], False),
    ],
)
def test_tested_once_drops_best_epoch_columns_only_when_every_run_tested_once(test_epochs, expected):
    from cawbench.reporting.report import _tested_once

    assert _tested_once(pd.DataFrame({"test_epochs": test_epochs}, dtype=object)) is expected


def test_contour_colour_bar_sits_right_of_every_panel():
    """Optuna's contour matrix shrinks its panels for the colour bar and a tight layout undoes that: the
    report's layout puts the bar in a column of its own."""
    import optuna

    from cawbench.reporting import figures

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("a", 0, 1) + t.suggest_float("b", 0, 1) ** 2
                   + t.suggest_float("c", 0, 1), n_trials=12)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = optuna.visualization.matplotlib.plot_contour(study, params=["a", "b", "c"])
    fig = axes.flat[0].figure
    figures._colour_bar_in_own_column(fig)
    bars = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]
    panels = [ax for ax in fig.axes if ax not in bars]
    assert len(bars) == 1 and len(panels) == 9
    right_edge = max(ax.get_position().x1 for ax in panels)
    assert bars[0].get_position().x0 > right_edge
    figures.plt.close(fig)
