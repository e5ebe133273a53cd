from __future__ import annotations

import subprocess
import sys

import pytest

from cawbench.cli import main
from cawbench.results import read_results


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_shows_every_registry(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for word in ("backprop", "fashion-mnist", "tiny-imagenet", "resnet17", "sip", "lcs", "recipes: paper["):
        assert word in out


def test_train_help_explains_the_config_order():
    out = subprocess.run(
        [sys.executable, "-m", "cawbench", "train", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "--recipe paper" in out.stdout and "KEY=VALUE" in out.stdout


def test_train_prints_a_result_table(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "train", "--dataset", "synthetic", "--width", "0.1", "--epochs", "1",
                           "--out-dir", str(tmp_path), "--no-progress", "optim.lr=1e-2")  # fmt: skip
    assert code == 0
    assert "backprop" in out and "test@best-val" in out
    assert len(read_results(tmp_path / "results.jsonl")) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "nope"], "unknown method 'nope'; valid methods: backprop"),
        (
            ["--dataset", "imagenet22k"],
            "unknown dataset 'imagenet22k'; valid datasets: cifar10, cifar100, digits",
        ),
        (["--arch", "resnet999"], "unknown architecture 'resnet999'; valid architectures: "),
        (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["--readout", "magic"], "unknown readout 'magic'; valid readouts: "),
        (["--depth", "0"], "model.depth (blocks per stage) must be >= 1"),
        (["--device", "cuda:7"], "CUDA is not available here"),
        (["--dataset", "mnist", "--data-dir", "/nonexistent"], "could not find the mnist dataset"),
    ],
)
def test_bad_input_is_one_clear_line_and_nothing_written(capsys, tmp_path, argv, message):
    code, _, err = run_cli(capsys, "train", "--dataset", "synthetic", "--out-dir", str(tmp_path), *argv)
    assert code == 2
    assert err.startswith("cawbench: error: ")
    assert message in err
    assert not (tmp_path / "results.jsonl").exists() and not (tmp_path / "runs").exists()
