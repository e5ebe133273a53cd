"""One-shot GPU check: environment, engine equivalence checks, `cawbench bench`, CAW-Conv's paper run.

Made for a lent GPU machine with a hard wall-clock limit: every stage runs in its own process under its own
timeout, the paper run stops itself cleanly (``train.time_limit_s``) before the budget ends, and every
result is copied under ``--out`` (at most 8 files, at most 2 folders deep):

    log.txt            everything printed by every stage (nvidia-smi and versions first)
    checks.json        environment; eager vs CUDA-graph and sequential vs pipeline equality; per-stage
                       timings; the top kernels of one training step (scripts/gpu_profile.py); the paper
                       run's mode, epochs, s/epoch and projected 150-epoch time
    bench_modes/<gpu>.md (+ .csv)   CAW-Conv and backprop in each engine mode (eager, per-unit streams,
                       CUDA graph, both, captured pipeline), run first: it decides the paper run's mode
    bench/<gpu>.md (+ .csv)         every other method beside its backprop reference
    paper_metrics.jsonl, paper_result.json   the paper run's per-epoch records and result row

``--dry-run`` runs the same stages at tiny sizes on the CPU (to test this script anywhere).
usage: python scripts/gpu_check.py --out DIR [--budget 560] [--data-dir .gpudata/fashion-mnist] [--dry-run]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, str(ROOT / "scripts" / "cawbench_inplace.py")]
T0 = time.monotonic()


def elapsed() -> float:
    return time.monotonic() - T0


class Log:
    def __init__(self, path: Path) -> None:
        self.fh = path.open("a")

    def __call__(self, text: str) -> None:
        line = f"[{elapsed():6.1f}s] {text}"
        print(line, flush=True)
        self.fh.write(line + "\n")
        self.fh.flush()


def run_stage(log: Log, name: str, cmd: list[str], timeout: float) -> tuple[int, float]:
    """Run one stage as a subprocess with a timeout; its output goes to the log. Returns (rc, seconds)."""
    log(f"stage {name}: timeout {timeout:.0f}s: {' '.join(cmd)}")
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, start_new_session=True) as proc:  # fmt: skip
        try:
            deadline = start + max(timeout, 1)
            assert proc.stdout is not None
            os.set_blocking(proc.stdout.fileno(), False)
            while proc.poll() is None and time.monotonic() < deadline:
                _drain(proc, log)
                time.sleep(0.2)
            if proc.poll() is None:
                log(f"stage {name}: timed out after {timeout:.0f}s; stopping it")
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait()
            _drain(proc, log)
        except BaseException:
            os.killpg(proc.pid, 9)
            raise
    seconds = time.monotonic() - start
    log(f"stage {name}: rc {proc.returncode} in {seconds:.1f}s")
    return proc.returncode, seconds


def _drain(proc: subprocess.Popen, log: Log) -> None:
    assert proc.stdout is not None
    while True:
        try:
            line = proc.stdout.readline()
        except (BlockingIOError, TypeError):
            return
        if not line:
            return
        log("  " + line.rstrip())


def environment(log: Log, dry: bool) -> str:
    lines = []
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        lines.append(smi.stdout)
    probe = (
        "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, "
        "'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version() if torch.cuda.is_available() "
        "else None); print(torch.cuda.get_device_properties(0) if torch.cuda.is_available() else 'no CUDA')"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    lines.append(res.stdout + res.stderr)
    text = "\n".join(lines)
    for line in text.splitlines():
        log(line)
    if not dry and "no CUDA" in text:
        log("WARNING: no CUDA device visible; the stages will fail or run on the CPU")
    return text


def available_methods() -> list[str]:
    code = ("import sys; sys.path.insert(0, 'scripts'); import cawbench_inplace; cawbench_inplace.setup(); "
            "from cawbench.method import list_methods; print(','.join(list_methods()))")  # fmt: skip
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if res.returncode:
        print(res.stderr, file=sys.stderr)
    return [m for m in res.stdout.strip().split(",") if m]


def mode_rows(main: str, dry: bool) -> str:
    """The main method (and backprop) in every engine mode: the decisive bench, run first."""
    rows = ["backprop", main, f"{main}{{train.parallel=streams}}"]
    if not dry:
        rows += [f"{main}{{train.cuda_graph=true}}", f"{main}{{train.parallel=streams;train.cuda_graph=true}}",
                 "backprop{train.cuda_graph=true}"]  # fmt: skip
    # Not benched: the captured pipeline (parallel=pipeline + cuda_graph). Its fill and drain ticks run
    # eagerly, which dominate a 30-batch bench epoch (measured 2640 img/s vs 5919 for the plain graph on
    # an H100, reports/gpu); its equality with the sequential mode is still checked.
    return ",".join(dict.fromkeys(rows))


def method_rows(methods: list[str], main: str) -> str:
    """Every other registered method, eagerly, each beside backprop on its own network."""
    return ",".join(m for m in methods if m not in ("backprop", main))


def read_bench(folder: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in folder.glob("*.csv"):
        with path.open() as fh:
            rows += list(csv.DictReader(fh))
    return rows


def fastest_mode(rows: list[dict[str, str]], equivalence: dict, main: str) -> dict[str, str]:
    """The quickest engine mode of the main method that ran in the bench and trained like the eager one."""
    modes = {f"{main}": {}, f"{main}{{train.cuda_graph=true}}": {"train.cuda_graph": "true"},
             f"{main}{{train.parallel=streams}}": {"train.parallel": "streams"},
             f"{main}{{train.parallel=streams;train.cuda_graph=true}}":
                 {"train.parallel": "streams", "train.cuda_graph": "true"},
             f"{main}{{train.parallel=pipeline;train.cuda_graph=true}}":
                 {"train.parallel": "pipeline", "train.cuda_graph": "true"}}  # fmt: skip
    checks = {f"{main}{{train.cuda_graph=true}}": "cuda_graph",
              f"{main}{{train.parallel=streams}}": "streams",
              f"{main}{{train.parallel=streams;train.cuda_graph=true}}": "streams_graph",
              f"{main}{{train.parallel=pipeline;train.cuda_graph=true}}": "pipeline_graph"}  # fmt: skip
    best, speed = {}, 0.0
    for row in rows:
        label = row["label"]
        if label not in modes or row.get("error") or not row.get("train_ips"):
            continue
        check = (equivalence.get(main) or {}).get(checks.get(label, ""), {})
        if label in checks and not (isinstance(check, dict) and check.get("relative", 1.0) < 1e-4):
            continue  # not shown to train like the eager mode: not used for the paper run
        if float(row["train_ips"]) > speed:
            best, speed = modes[label], float(row["train_ips"])
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the results (the device tool's $OUT)")
    p.add_argument("--budget", type=float, default=560.0, help="seconds for the whole script")
    p.add_argument("--data-dir", default=".gpudata/fashion-mnist", help="Fashion-MNIST's four .gz files")
    p.add_argument("--bench-budget", type=float, default=160.0, help="seconds for the bench stage")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (tests this script)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "log.txt")
    dry = args.dry_run
    checks: dict[str, object] = {"dry_run": dry, "budget_s": args.budget}

    def save_checks() -> None:
        (out / "checks.json").write_text(json.dumps(checks, indent=2))

    checks["environment"] = environment(log, dry)
    methods = available_methods()
    log(f"registered methods: {', '.join(methods) or '(none: import failed)'}")
    main_method = "caw_conv" if "caw_conv" in methods else "backprop"
    checks["methods"] = methods

    # 1. Equality of the engine modes (CUDA graph vs eager, pipeline vs sequential).
    eq_json = out / "equivalence.tmp.json"
    eq_methods = (
        "backprop" if dry else ",".join(dict.fromkeys(m for m in ("backprop", main_method) if m in methods))
    )
    rc, sec = run_stage(log, "equivalence", [sys.executable, str(ROOT / "scripts" / "engine_equivalence.py"),
                        "--device", "cpu" if dry else "cuda", "--methods", eq_methods, "--json", str(eq_json),
                        "--images", "100" if dry else "485"],
                        75)  # fmt: skip
    checks["equivalence"] = json.loads(eq_json.read_text()) if eq_json.is_file() else {"rc": rc}
    eq_json.unlink(missing_ok=True)
    checks["equivalence_s"] = sec
    save_checks()

    # 2. The bench: engine modes of the main method first (they decide the paper run), then the others.
    sizes = (["--width", "0.1", "--input", "1x16x16", "--batch", "16", "--steps", "1", "--repeats", "1",
              "--warmup", "0", "--eval-steps", "1", "--device", "cpu"] if dry else
             ["--batch", "128", "--steps", "30", "--repeats", "3", "--warmup", "1", "--eval-steps", "2",
              "--eval-batch", "512", "--device", "cuda"])  # fmt: skip
    note = ["--note", "lent GPU machine, one-shot scripts/gpu_check.py run"]
    stages = [("bench_modes", mode_rows(main_method, dry), args.bench_budget * 0.5)]
    if method_rows(methods, main_method):
        stages.append(("bench", method_rows(methods, main_method), args.bench_budget * 0.5))
    for name, rows, budget in stages:
        cmd = [*CLI, "bench", "--methods", rows, *sizes, "--out", str(out / name), *note]
        rc, sec = run_stage(log, name, cmd, min(budget, max(args.budget - elapsed() - 150, 20)))
        checks[f"{name}_s"], checks[f"{name}_rc"] = sec, rc
        save_checks()
    mode = {} if dry else fastest_mode(read_bench(out / "bench_modes"), checks["equivalence"], main_method)
    checks["paper_run_mode"] = mode
    save_checks()

    # 2b. Where the device time of one eager training step goes (top kernels; the graph replays them).
    prof_json = out / "profile.tmp.json"
    prof_cmd = [sys.executable, str(ROOT / "scripts" / "gpu_profile.py"), "--method", main_method,
                "--json", str(prof_json), *(["--device", "cpu", "--width", "0.1", "--batch", "16", "--input",
                "16", "--steps", "1"] if dry else ["--device", "cuda"])]  # fmt: skip
    rc, sec = run_stage(log, "profile", prof_cmd, 45)
    checks["profile"] = json.loads(prof_json.read_text()) if prof_json.is_file() else {"rc": rc}
    prof_json.unlink(missing_ok=True)
    save_checks()

    # 3. CAW-Conv's paper recipe on Fashion-MNIST for as long as the budget allows.
    run_dir = Path("/tmp/gpu_check_runs") if not dry else out / "runs.tmp"
    run_name = f"{main_method}-fmnist-paper"
    startup, margin = 30.0, 25.0  # data loading/model build before the time limit counts; final write
    limit = args.budget - elapsed() - startup - margin
    if limit < 20:
        log(f"no time left for the paper run ({limit:.0f}s)")
        save_checks()
        return 0
    train_cmd = [*CLI, "train", "--method", main_method, "--recipe", "paper", "--dataset", "fashion-mnist",
                 "--data-dir", args.data_dir, "--out-dir", str(run_dir), "--run-name", run_name, "--no-progress",
                 "-s", f"train.time_limit_s={limit:.0f}", "-s", "train.checkpoint=false"]  # fmt: skip
    for key, value in mode.items():
        train_cmd += ["-s", f"{key}={value}"]
    if dry:
        train_cmd += ["--device", "cpu", "--width", "0.1", "--subset", "256", "--test-subset", "128",
                      "-s", "data.val_subset=128", "-s", "data.image_size=16", "--epochs", "3",
                      "--batch-size", "64", "-s", "train.eval_batch_size=128"]  # fmt: skip
    rc, sec = run_stage(log, "paper", train_cmd, limit + startup + margin - 5)
    checks["paper_rc"], checks["paper_s"] = rc, sec
    folder = run_dir / "runs" / run_name
    for src, dst in (("metrics.jsonl", "paper_metrics.jsonl"), ("result.json", "paper_result.json")):
        if (folder / src).is_file():
            shutil.copy(folder / src, out / dst)
    checks["paper"] = summarise_run(folder)
    if dry:
        shutil.rmtree(run_dir, ignore_errors=True)
    save_checks()
    log(f"done in {elapsed():.0f}s: {json.dumps(checks['paper'])}")
    return 0


def summarise_run(folder: Path) -> dict[str, object]:
    """Epochs done, seconds per epoch, and what 150 epochs would take at that pace."""
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        return {"epochs": 0}
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    times = [r["epoch_time_s"] for r in records]
    steady = times[1:] or times
    per_epoch = sum(steady) / len(steady)
    last = records[-1]
    summary: dict[str, object] = {
        "epochs": len(records),
        "first_epoch_s": times[0],
        "steady_epoch_s": per_epoch,
        "train_s_per_epoch": sum(r["train_time_s"] for r in records[1:] or records) / len(steady),
        "eval_s_per_epoch": sum(r["eval_time_s"] for r in records[1:] or records) / len(steady),
        "projected_150_epochs_s": times[0] + 149 * per_epoch,
        "last_val_acc": last.get("val_acc"),
        "last_test_acc": last.get("test_acc"),
    }
    result = folder / "result.json"
    if result.is_file():
        row = json.loads(result.read_text())
        for key in ("final_test_acc", "max_test_acc", "truncated", "epochs", "epochs_planned", "wall_time_s",
                    "peak_cuda_mem_bytes", "train_images_per_s", "device", "precision"):  # fmt: skip
            summary[key] = row.get(key)
    return summary


if __name__ == "__main__":
    sys.exit(main())
