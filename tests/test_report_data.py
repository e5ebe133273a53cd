"""Reports of a tiny synthetic ladder (CAW-Conv, DeeperForward, one rung, backprop): the ablation against
the previous rung and the reference, cost against the backprop twin, per-layer loss terms and assignment
diagnostics, provenance, and re-rendering a report folder from its own data with the runs gone. Also the
known results in the paper table, the index of reports/, a search drawn from hand-made trials, and the
report metadata every registered method resolves to."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
T_975_DF1 = 12.706204736174707  # t(0.975, 1), as printed in statistics tables

LADDER = """\
name: tiny_ladder
description: A tiny synthetic ladder from DeeperForward to CAW-Conv. Rendered by the report tests.
base: {method: caw_conv, data.name: synthetic, model.width: 0.1, model.depth: 1, optim.lr: 0.01,
       train.epochs: 2, data.subset: 200, data.val_size: 100, data.test_subset: 100, readout.extra: [sip]}
scales:
  cpu: {}
  paper: {train.epochs: 150, model.width: 1.0, data.subset: null}
variants:
  caw_conv: {}
  deeperforward: {method: deeperforward}
  ladder01_learnable: {method: deeperforward, params.assignment: learnable}
  backprop: {method: backprop}
reference: caw_conv
seeds: [0, 1]
objective: {metric: final_val_acc, direction: maximize}
sampler: {name: grid}
pruner: {name: none}
"""


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    """The ladder study run by the real runner, and its report rendered by the CLI with the default --out."""
    from cawbench.cli import main
    from cawbench.studies.runner import RunOptions, run_study
    from cawbench.studies.spec import load_spec

    root = tmp_path_factory.mktemp("ladder")
    spec = root / "tiny_ladder.yaml"
    spec.write_text(LADDER)
    out_dir = root / "runs"
    opts = RunOptions(
        spec=load_spec(spec), out_dir=out_dir, tracking_uri="off", echo_progress=False, device="cpu"
    )
    assert run_study(opts)["counts"] == {"COMPLETE": 8}
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["report", str(spec), "--out-dir", str(out_dir)]) == 0
    return root, out_dir, out_dir / "reports" / "tiny_ladder-cpu", printed.getvalue()


def _table(folder: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(folder / "tables" / f"{name}.csv", keep_default_na=False)


def test_report_goes_under_the_results_folder_and_ends_with_the_three_lines(ladder):
    _, out_dir, report, printed = ladder
    assert (report / "README.md").is_file()
    lines = printed.strip().splitlines()
    assert f"report written to {report / 'README.md'}" in printed
    ranking, scale, paper = (line.strip() for line in lines[-3:])
    assert ranking.startswith("Ranking at this scale") and all(
        v in ranking for v in ("caw_conv", "deeperforward", "ladder01_learnable", "backprop")
    )
    assert scale.startswith(
        "Scale `cpu` against the paper's budget (`caw_conv`): 2 of 150 epochs, width 0.1 of 1"
    )
    assert "cawbench study run tiny_ladder --scale paper --device cuda" in paper


def test_ablation_pairs_each_rung_with_the_one_before_and_with_the_reference(ladder):
    _, out_dir, report, _ = ladder
    table = _table(report, "ablation").set_index("configuration")
    results = pd.read_json(out_dir / "results.jsonl", lines=True)
    acc = results.pivot(index="seed", columns="study_variant", values="final_test_acc")

    def cell(diffs: pd.Series) -> str:
        half = T_975_DF1 * diffs.std(ddof=1) / math.sqrt(2)
        low, high = diffs.mean() - half, diffs.mean() + half
        text = f"{diffs.mean():+.2f} [{low:+.2f}, {high:+.2f}] (2)"
        return text if (low > 0 or high < 0) else f"{text}, not resolved"

    assert list(table.index) == ["caw_conv", "deeperforward", "ladder01_learnable", "backprop"]
    assert table.loc["ladder01_learnable", "builds on"] == "deeperforward"  # the variant before it
    assert table.loc["ladder01_learnable", "Δ vs previous rung"] == cell(
        acc["ladder01_learnable"] - acc["deeperforward"]
    )
    for variant in ("deeperforward", "ladder01_learnable", "backprop"):
        assert table.loc[variant, "Δ vs caw_conv"] == cell(acc[variant] - acc["caw_conv"]), variant
    assert table.loc["caw_conv", "Δ vs caw_conv"] == "reference"
    assert table.loc["caw_conv", "final-epoch test"].endswith("(2)")  # every mean shows its n


def test_cost_divides_by_the_backprop_twin_of_the_same_network(ladder):
    _, out_dir, report, _ = ladder
    cost = _table(report, "cost").set_index("configuration")
    results = pd.read_json(out_dir / "results.jsonl", lines=True)
    speed = results.groupby("study_variant")["train_images_per_s"].mean()
    assert cost.loc["caw_conv", "backprop twin"] == "backprop"
    assert cost.loc["backprop", "backprop twin"] == "itself"
    ratio = speed["caw_conv"] / speed["backprop"]
    assert cost.loc["caw_conv", "train speed x twin (> 1 = faster)"] == f"{ratio:.2f}x"
    assert cost.loc["deeperforward", "s per epoch"].endswith("(2)")


def test_per_layer_terms_diagnostics_and_assignments_are_drawn(ladder):
    _, _, report, _ = ladder
    figures = {p.stem for p in (report / "figures").iterdir()}
    for name in ("learning_curves_synthetic", "per_layer_synthetic", "loss_terms_layers_caw_conv_synthetic",
                 "loss_terms_synthetic", "assignment_diagnostics_layers_caw_conv_synthetic",
                 "lcs_weights_synthetic", "assignment_synthetic"):  # fmt: skip
        assert name in figures, name
    terms = pd.read_csv(report / "tables" / "loss_terms_synthetic.csv")
    assert {"ce", "entropy", "ortho"} <= set(terms["quantity"]) and (terms["n"] == 2).all()
    diagnostics = pd.read_csv(report / "tables" / "assignment_diagnostics_synthetic.csv")
    assert "temperature" in set(diagnostics["quantity"])
    # fixed assignments are drawn too, as the one-hot baseline; only learnable ones have a temperature
    assert set(diagnostics["label"]) == {"caw_conv", "ladder01_learnable", "deeperforward"}
    temperature = diagnostics[diagnostics["quantity"] == "temperature"]
    assert set(temperature["label"]) == {"caw_conv", "ladder01_learnable"}


def test_rows_and_header_carry_provenance(ladder):
    _, out_dir, report, _ = ladder
    rows = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    for row in rows:
        assert re.fullmatch(r"[0-9a-f]{40}", row["git_commit"]) and isinstance(row["git_dirty"], bool)
        assert row["machine"]
    markdown = (report / "README.md").read_text()
    assert f"**Code (runs):** git `{rows[0]['git_commit'][:10]}` (8 runs" in markdown
    assert "span" not in markdown.split("**Code (runs):**")[1].splitlines()[0]  # one commit


def test_a_report_spanning_commits_says_so(ladder, tmp_path):
    from cawbench.reporting.report import _Builder
    from cawbench.reporting.source import load_source

    _, _, report, _ = ladder
    source = load_source(str(report))
    source.rows.loc[0, "git_commit"] = "0" * 40
    source.rows["git_dirty"] = source.rows["git_dirty"].astype(object)
    source.rows.loc[1, "git_dirty"] = None
    code = _Builder(source, tmp_path, "test", None, [], None)._provenance_lines()[0]
    assert "the runs span 2 commits" in code and "`0000000000` (1 run " in code
    assert "dirty flag not recorded" in code


def test_report_folder_rerenders_identically_without_the_runs(ladder, tmp_path, capsys):
    from cawbench.cli import main

    root, out_dir, report, _ = ladder
    copy = tmp_path / "elsewhere" / "tiny_ladder-cpu"
    shutil.copytree(report, copy)
    assert not list((copy / "data").rglob("checkpoint*")), "a report folder never ships checkpoints"
    hidden = root / "runs-hidden"
    out_dir.rename(hidden)  # nothing of the study is left: no storage, no run folders
    try:
        assert main(["report", str(copy)]) == 0
    finally:
        hidden.rename(out_dir)
    assert f"report written to {copy / 'README.md'}" in capsys.readouterr().out
    originals = sorted(p.name for p in (report / "tables").iterdir())
    assert originals == sorted(p.name for p in (copy / "tables").iterdir())
    for name in originals:
        assert (copy / "tables" / name).read_bytes() == (report / "tables" / name).read_bytes(), name
    figures = sorted(p.name for p in (report / "figures").iterdir())
    assert figures == sorted(p.name for p in (copy / "figures").iterdir())
    for name in figures:
        assert (copy / "figures" / name).read_bytes() == (report / "figures" / name).read_bytes(), name
    markdown = (copy / "README.md").read_text()
    assert f"re-rendered from this folder's `data/` by `cawbench report {copy}`" in markdown


CHECKED_IN = sorted(p.parent.parent.name for p in (ROOT / "reports").glob("*/data/source.json"))


@pytest.mark.slow
@pytest.mark.parametrize("folder", CHECKED_IN)
def test_checked_in_report_rerenders_to_the_same_tables(folder, tmp_path):
    """Every checked-in report that ships its data re-renders from that data alone to the tables it holds."""
    from cawbench.cli import main

    report = ROOT / "reports" / folder
    copy = tmp_path / folder
    shutil.copytree(report, copy)
    assert main(["report", str(copy)]) == 0
    names = sorted(p.name for p in (report / "tables").iterdir())
    assert names == sorted(p.name for p in (copy / "tables").iterdir())
    for name in names:
        assert (copy / "tables" / name).read_bytes() == (report / "tables" / name).read_bytes(), name


def test_git_keeps_a_report_folders_run_data():
    """A report's data/runs/ must be committed: an ignore rule for the studies' runs/ folder that also
    matched reports/*/data/runs/ once left a fresh clone re-rendering checked-in reports without their
    per-epoch metrics (fewer tables than the folder holds)."""
    import subprocess

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    probe = "reports/any-report/data/runs/study/run/metrics.jsonl"
    ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT, check=False)
    assert ignored.returncode == 1, f"{probe} is git-ignored: fix .gitignore"
    assert subprocess.run(["git", "check-ignore", "-q", "runs/x"], cwd=ROOT, check=False).returncode == 0


# ------------------------------------------------------------------------------------------ known results
def test_paper_table_holds_every_known_result_with_its_budget():
    from cawbench.reporting.paper import known_frame, load_known_results, load_paper_results, paper_comparison

    known = load_known_results()  # studies/known_results.csv and the files it names
    gpu = json.loads((ROOT / "reports" / "gpu" / "paper_result.json").read_text())
    rows = pd.DataFrame(columns=["label", "method", "dataset", "width", "depth_label", "arch"])
    display, _ = paper_comparison(rows, load_paper_results(), "final_val_acc", "maximize", None,
                                  known_frame(known), "cpu")  # fmt: skip
    by = display.set_index(["method", "dataset", "variant"])
    partial = "ours: H100, recipe stopped early (epochs run/planned)"
    expected = f"{gpu['final_test_acc']:.2f} (1), {gpu['epochs']}/{gpu['epochs_planned']} ep"
    assert by.loc[("CAW-Conv", "Fashion-MNIST", "base"), partial] == expected
    assert by.loc[("CAW-Conv", "CIFAR-10", "base"), partial] == "–"
    full = "ours: H100, full recipe"
    assert by.loc[("CwComp", "Fashion-MNIST", "base"), full].endswith("(1)")
    # CaFo has no published Fashion-MNIST number: its run still gets a row, the paper cell empty.
    cafo = display[(display["method"] == "CaFo") & (display["paper note"] == "no published number")]
    assert len(cafo) == 1 and cafo.iloc[0]["paper top-1 %"] == "–" and cafo.iloc[0][full] != "–"
    assert not any(r.get("recipe") == "paper-cafo" for r in known)  # the 1-epoch BP twins are left out


# ------------------------------------------------------------------------------------------ the index
def test_index_lists_every_report_folder(ladder, tmp_path):
    from cawbench.cli import main
    from cawbench.config import ConfigError
    from cawbench.reporting.index import write_index

    _, _, report, _ = ladder
    reports = tmp_path / "reports"
    shutil.copytree(report, reports / "tiny_ladder-cpu")
    (reports / "bench").mkdir()
    (reports / "bench" / "cpu.md").write_text("numbers")
    (reports / "index.yaml").write_text(
        "bench: {question: What it costs, scale: paper widths, seeds: '-', command: cawbench bench}\n"
        "tiny_ladder-cpu: {finding: The rung is not resolved at this scale.}\n"
    )
    assert main(["report", "--index", str(reports)]) == 0
    text = (reports / "README.md").read_text()
    ladder_line = next(line for line in text.splitlines() if line.startswith("| [tiny_ladder-cpu]"))
    assert "A tiny synthetic ladder from DeeperForward to CAW-Conv." in ladder_line
    assert "| cpu | 0, 1 |" in ladder_line and "The rung is not resolved at this scale." in ladder_line
    assert "cawbench study run tiny_ladder --scale cpu" in ladder_line
    bench_line = next(line for line in text.splitlines() if line.startswith("| [bench]"))
    assert "What it costs" in bench_line and "finding not written yet" in bench_line
    (reports / "index.yaml").write_text("gone: {finding: x}\n")
    with pytest.raises(ConfigError, match="'gone', which is not a folder"):
        write_index(reports)


def test_checked_in_index_is_current():
    """reports/README.md is what `cawbench report --index` writes from the checked-in folders."""
    from cawbench.reporting.index import index_rows

    rows = index_rows(ROOT / "reports")
    text = (ROOT / "reports" / "README.md").read_text()
    for row in rows:
        assert row["report"] in text and row["command"] in text, row["report"]


def test_reports_hold_outputs_only():
    programs = [p for p in (ROOT / "reports").rglob("*") if p.suffix in (".py", ".sh", ".ipynb")]
    assert not programs, f"programs belong in scripts/ or cawbench, not reports/: {programs}"


# ------------------------------------------------------------------------------------------ a search
def _search_source(tmp_path: Path, lr_effect: float):
    """A results folder of 5 configurations x 2 seeds and the Optuna trials behind them (made by hand):
    accuracy = 60 + lr_effect * log10(lr / 1e-3) + seed noise of 2 points; two more trials were pruned."""
    from cawbench.reporting.snapshot import study_from_trials
    from cawbench.reporting.source import load_source

    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    rows, trials = [], []
    dist = {"optim.lr": {"name": "FloatDistribution", "attributes": {"low": 1e-5, "high": 0.1, "log": True,
                                                                     "step": None}},
            "params.dropout": {"name": "FloatDistribution", "attributes": {"low": 0.0, "high": 0.5, "log": False,
                                                                           "step": None}}}  # fmt: skip
    for i, lr in enumerate(lrs):
        for seed in (0, 1):
            value = 60 + lr_effect * math.log10(lr / 1e-3) + (2.0 if seed else -2.0)
            params = {"optim.lr": lr, "params.dropout": 0.1 * i}
            number = len(trials)
            rows.append({"method": "backprop", "dataset": "digits", "arch": "mlp", "width": 1.0, "epochs": 3,
                         "n_train": 300, "readout": "last", "seed": seed, "config_id": f"c{i}",
                         "search_params": params, "final_val_acc": value, "final_test_acc": value - 1,
                         "trial": number, "study": "s"})  # fmt: skip
            trials.append({"number": number, "state": "COMPLETE", "params": params,
                           "distributions": {k: json.dumps(v) for k, v in dist.items()}, "value": value,
                           "intermediate_values": {"0": value - 10, "1": value - 3, "2": value}, "user_attrs": {}})  # fmt: skip
    for k in range(2):
        trials.append({"number": len(trials), "state": "PRUNED", "params": {"optim.lr": 0.05, "params.dropout": 0.4},
                       "distributions": {k2: json.dumps(v) for k2, v in dist.items()}, "value": None,
                       "intermediate_values": {"0": 20.0 + k, "1": 21.0}, "user_attrs": {}})  # fmt: skip
    folder = tmp_path / "search"
    folder.mkdir()
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = load_source(str(folder))
    source.trials = trials
    source.study = study_from_trials(trials, "maximize")
    source.trial_counts = {"COMPLETE": 10, "PRUNED": 2}
    source.facts = {"objective": "final_val_acc", "direction": "maximize", "sampler": {"name": "tpe"},
                    "pruner": {"name": "median"}, "paper_defaults": {"optim.lr": 1e-3, "params.dropout": 0.0},
                    "dimensions": [{"key": "optim.lr", "type": "float", "log": True},
                                   {"key": "params.dropout", "type": "float", "log": False}]}  # fmt: skip
    return source


@pytest.mark.parametrize("lr_effect", [10.0, 0.5])
def test_search_sections_follow_the_spread_check(tmp_path, lr_effect):
    from cawbench.reporting.report import render_report

    report = render_report(
        _search_source(tmp_path, lr_effect), tmp_path / "report", "test", known_results="none"
    )
    figures = set(report.figures)
    assert {"sensitivity", "optimisation_history", "intermediate_values", "parallel_coordinate"} <= figures
    spread = report.tables["spreads"].iloc[0]
    assert spread["seed_sd"] == pytest.approx(
        math.sqrt(8)
    )  # seeds at -2 / +2: sd 2.83 in every configuration
    if lr_effect == 10.0:  # configuration means 60 + 10 * log10(lr / 1e-3): far apart
        assert bool(spread["informative"]) and {"importance", "contour"} <= figures
        assert "importance" in report.tables
    else:  # half a point per decade: inside the seed noise
        assert not spread["informative"]
        assert not {"importance", "contour"} & figures and "importance" not in report.tables
        assert "**the configurations do not differ by more than the seeds do**" in report.markdown
    assert "The dashed line is the paper's default (optim.lr = 0.001, params.dropout = 0)" in report.markdown


# ------------------------------------------------------------------------------------------ method metadata
def _methods() -> list[str]:
    from cawbench.method import list_methods

    return list_methods()


@pytest.mark.parametrize("name", _methods())
def test_every_method_has_report_metadata_and_a_real_twin(name):
    from cawbench.method import get_method, recipes_of
    from cawbench.reporting.methods_info import method_report_info

    info = method_report_info(name)
    assert info.label and info.paper_names
    if info.end_to_end:
        assert info.bp_twin is None
        return
    twins = [n for n in _methods() if method_report_info(n).end_to_end]
    assert len(twins) == 1
    assert info.bp_twin in recipes_of(get_method(twins[0])), (  # its own, or one a method brought
        f"{name}'s twin recipe {info.bp_twin!r} does not exist"
    )


def test_mlflow_uri_is_written_relative_to_the_results_folder(ladder, tmp_path):
    from cawbench.reporting.report import _Builder
    from cawbench.reporting.source import load_source

    _, _, report, _ = ladder
    source = load_source(str(report))
    source.out_dir = Path("runs/quickstart")
    source.study_attrs = {"mlflow_tracking_uri": "sqlite:////home/someone/clone/runs/quickstart/mlflow.db",
                          "mlflow_parent_run_id": "abc123"}  # fmt: skip
    line = _Builder(source, tmp_path, "test", None, [], None)._mlflow_line()[0]
    assert "`sqlite:///runs/quickstart/mlflow.db`" in line and "/home/someone" not in line
    assert "parent run `abc123`" in line
    source.study_attrs["mlflow_tracking_uri"] = "http://tracking:5000"  # a server: as it is
    assert "`http://tracking:5000`" in _Builder(source, tmp_path, "test", None, [], None)._mlflow_line()[0]


def test_a_report_from_a_study_keeps_the_projects_known_results(ladder):
    """Rendered from a study without --known-results, the folder's data/ holds studies/known_results.csv's
    rows, so a re-render from the folder shows the same known-results columns."""
    from cawbench.reporting.paper import load_known_results
    from cawbench.results import read_results

    _, _, report, _ = ladder
    kept = read_results(report / "data" / "known_results.jsonl")
    expected = load_known_results()
    assert expected, "studies/known_results.csv lists rows"
    assert [(r["method"], r["known_source"]) for r in kept] == [
        (r["method"], r["known_source"]) for r in expected
    ]
