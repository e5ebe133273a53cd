from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

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
        (["--width=inf"], "model.width must be a finite number > 0"),
        (["model.width=.nan"], "model.width expects a number, got nan"),
        (["--run-name", "../../escaped"], "run_name='../../escaped' must be a relative folder path under"),
        (["--run-name", "/tmp/abs"], "run_name='/tmp/abs' must be a relative folder path under"),
        (
            ["data.val_size=0", "--readout", "sip"],
            "data.val_size=0 leaves no validation images, but readout 'sip'",
        ),
        (
            ["data.val_size=0", "readout.lcs_signal=val", "--readout", "lcs"],
            "readout 'lcs' is fitted on valid",
        ),
        (["--subset", "1"], "1 training image(s) left (data.subset=1"),
        pytest.param(
            ["--device", "mps"],
            "MPS (Apple GPU) is not available here",
            marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS"),
        ),
    ],
)
def test_bad_input_is_one_clear_line_and_nothing_written(capsys, tmp_path, argv, message):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "train", "--dataset", "synthetic", "--out-dir", str(out), *argv)
    assert code == 2
    assert err.startswith("cawbench: error: ") and "Traceback" not in err
    assert message in err
    assert not any(tmp_path.iterdir())  # nothing written, in --out-dir or beside it (../escaped)


def test_binary_config_and_an_out_dir_that_is_a_file_are_clear_errors(capsys, tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    code, _, err = run_cli(capsys, "train", "--dataset", "synthetic", "-c", str(binary))
    assert code == 2 and f"config file '{binary}' is not a text (YAML) file" in err
    for out_dir in (binary, binary / "below"):
        code, out, err = run_cli(capsys, "train", "--dataset", "synthetic", "--out-dir", str(out_dir))
        assert code == 2 and f"{binary} is a file, not a folder" in err
        assert out == ""  # refused before any data are loaded
    assert binary.read_bytes() == bytes(range(256)) * 4


def _folder(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_a_finished_run_is_never_overwritten_or_repeated_by_accident(capsys, tmp_path):
    base = ["train", "--dataset", "synthetic", "--width", "0.1", "--epochs", "1", "--out-dir", str(tmp_path),
            "--no-progress", "--run-name", "mine", "optim.lr=1e-2"]  # fmt: skip
    results, run = tmp_path / "results.jsonl", tmp_path / "runs" / "mine"
    assert run_cli(capsys, *base)[0] == 0
    folder, rows = _folder(run), results.read_text()
    assert {"checkpoint.pt", "config.yaml", "metrics.jsonl", "result.json"} <= set(folder)

    # The same --run-name with another config, or the same config again: refused, nothing touched.
    for extra in (["--seed", "3"], []):
        code, _, err = run_cli(capsys, *base, *extra)
        assert code == 2 and f"run folder {run} already holds a finished run" in err
        assert "--resume" in err and "--overwrite" in err
        assert _folder(run) == folder and results.read_text() == rows

    # --resume of the finished run: says so, exit 0, no new row, folder untouched.
    code, out, _ = run_cli(capsys, *base, "--resume")
    assert code == 0 and "is already finished" in out and "no new row" in out
    assert _folder(run) == folder and results.read_text() == rows
    # ... unless its row was lost (killed between result.json and the append): then it is added, once.
    results.write_text("")
    for _ in range(2):
        assert run_cli(capsys, *base, "--resume")[0] == 0
    assert read_results(results) == [json.loads(rows)]

    # A checkpoint edited by hand (same config hash, other tensor shapes) is refused with a remedy.
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    name = next(k for k, v in state["net"].items() if v.dim() == 4)
    state["net"][name] = torch.zeros(3, 3, 3, 3)
    torch.save(state, run / "checkpoint.pt")
    code, _, err = run_cli(capsys, *base, "--resume")
    assert (
        code == 2
        and "does not fit this run's network or optimisers" in err
        and f"size mismatch for {name}" in err
    )

    # --overwrite replaces the folder whole (a note says so); the earlier row stays.
    code, _, err = run_cli(capsys, *base, "--seed", "3", "--overwrite")
    assert code == 0 and "--overwrite: replacing the finished run" in err
    new = read_results(results)
    assert len(new) == 2 and new[0] == json.loads(rows) and new[1]["seed"] == 3
    assert json.loads((run / "result.json").read_text())["seed"] == 3


def test_a_last_training_batch_of_one_image_is_merged_on_digits_with_batchnorm(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "--dataset", "digits", "--width", "0.1", "--epochs", "1",
                             "--subset", "129", "--batch-size", "128", "--no-progress", "--out-dir", str(tmp_path))  # fmt: skip
    assert code == 0, err
    assert read_results(tmp_path / "results.jsonl")[0]["n_train"] == 129


def test_no_validation_split_says_what_falls_back(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--dataset", "synthetic", "--width", "0.1", "--epochs", "1",
                           "--no-progress", "--out-dir", str(tmp_path), "data.val_size=0")  # fmt: skip
    assert code == 0
    assert (
        "data.val_size=0 leaves no validation split" in err
        and "test_acc_at_best_val is the last epoch's" in err
    )
    row = read_results(tmp_path / "results.jsonl")[0]
    assert row["n_val"] == 0 and row["test_acc_at_best_val"] == row["final_test_acc"]


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["list"]) == 141  # `cawbench study status ... | head`: no traceback
    monkeypatch.undo()
    assert capsys.readouterr().err == ""


def test_a_bug_shows_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("an internal invariant failed")

    monkeypatch.setattr("cawbench.cli.run_list", broken)
    code, _, err = run_cli(capsys, "list")
    assert code == 1
    assert "Traceback" in err and "RuntimeError: an internal invariant failed" in err
    assert "internal error (a bug, not your input): please report it" in err
