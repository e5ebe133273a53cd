"""Do two checkouts train bit for bit alike? Every registered method, short CPU runs, compared exactly.

usage: OMP_WAIT_POLICY=PASSIVE python scripts/training_identity.py --tree before=/path/to/old/checkout \
           --tree after=. [--json FILE] [--methods a,b] [--epochs 2]

Each checkout trains the same cases in a process of its own, with its own ``.venv/bin/python`` (so each
imports its own ``cawbench``; the worker checks that it did): every registered method with its smoke settings
on the ``synthetic`` dataset (dropout left on where the method has it, backprop's set to 0.2 so that its
dropout is drawn too), plus the channel-wise methods under ``train.merge_units=none|steps``, bf16 autocast
and the pipeline executor, through :meth:`cawbench.engine.Trainer.run` (training, evaluation, readouts).
Per case it records a SHA-256 of every parameter and buffer (bytes), the epoch records and the result row,
leaving out only what measures time, memory or the host (keys named ``*time*``, ``*_s``, ``*ips*``,
``*mem*``, ``*date*``, paths, versions). The two checkouts' records must be equal: the same bytes, the
same floats. Exit status 1 when any case differs (the differing fields are printed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

#: key fragments of records that are measurements of the run, not its results
VOLATILE = (
    "time",
    "ips",
    "mem",
    "date",
    "host",
    "version",
    "git",
    "path",
    "dir",
    "device_name",
    "wall",
    "started",
    "finished",
)


def cases(methods: list[str], epochs: int) -> dict[str, dict[str, Any]]:
    """Name -> config overrides (on top of the method's smoke settings on synthetic data)."""
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        base = {"method": method, "train.epochs": epochs, "train.seed": 3, "train.deterministic": True}
        if method == "backprop":
            base["params.dropout"] = 0.2
        out[method] = base
        if method in ("caw_conv", "deeperforward"):
            for merge in ("none", "steps"):
                out[f"{method}{{merge_units={merge}}}"] = {**base, "train.merge_units": merge}
            out[f"{method}{{bf16}}"] = {**base, "train.precision": "bf16"}
            out[f"{method}{{pipeline}}"] = {**base, "train.parallel": "pipeline"}
    return out


def _volatile(key: str) -> bool:
    key = key.lower()
    return any(part in key for part in VOLATILE) or key.endswith("_s")


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if not _volatile(str(k))}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return repr(value)  # exact (nan and inf too)
    return value


def run_case(overrides: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    import torch

    from cawbench.engine import Trainer
    from cawbench.method import get_method, resolve_config

    cls = get_method(overrides["method"])
    layer = {"data.name": "synthetic", "train.device": "cpu", "train.progress": False,
             "train.checkpoint": False, "out_dir": str(out_dir), **cls.smoke_overrides, **overrides}  # fmt: skip
    trainer = Trainer(resolve_config(layer), write_result=False)
    result = trainer.run()
    tensors = {}
    for name, t in trainer.net.state_dict().items():
        t = t.detach().cpu().contiguous()
        tensors[name] = (
            hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()[:16] if t.numel() else ""
        )
    return {"tensors": tensors, "history": _clean(trainer.history), "result": _clean(result)}


def worker(tree: str, names: list[str], epochs: int, out: str) -> None:
    import torch

    torch.set_num_threads(1)  # light on shared cores; the kernels' results do not depend on it here
    import cawbench

    where = Path(cawbench.__file__).resolve()
    if Path(tree).resolve() not in where.parents:
        sys.exit(f"this interpreter imports cawbench from {where}, not from {tree}")
    records: dict[str, Any] = {"_cawbench": str(where)}
    chosen = cases(names, epochs)
    with tempfile.TemporaryDirectory(prefix="training_identity_") as tmp:
        for case, overrides in chosen.items():
            try:
                records[case] = run_case(overrides, Path(tmp) / case.replace("{", "_").replace("}", ""))
            except Exception as exc:  # recorded: an error must be the same error in both checkouts
                records[case] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"  {case}: done", flush=True)
    Path(out).write_text(json.dumps(records, indent=1, sort_keys=True))


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                out.append(f"{where}/{key}: only in {'after' if key not in a else 'before'}")
            else:
                out += differences(a[key], b[key], f"{where}/{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {str(a)[:80]} != {str(b)[:80]}"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, metavar="NAME=PATH", help="exactly two")
    p.add_argument("--methods", default="all", help="comma list (default: every registered method)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--json", help="write every case's comparison here")
    p.add_argument("--worker", nargs=2, metavar=("TREE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker[0], args.methods.split(","), args.epochs, args.worker[1])
        return 0
    trees = dict(t.split("=", 1) for t in args.tree)
    if len(trees) != 2:
        sys.exit("--tree: give exactly two, e.g. --tree before=/old/checkout --tree after=.")
    records = {}
    with tempfile.TemporaryDirectory(prefix="training_identity_") as tmp:
        for name, tree in trees.items():
            python = Path(tree).resolve() / ".venv" / "bin" / "python"
            if not python.is_file():
                sys.exit(f"{tree}: no .venv/bin/python")
            methods = args.methods
            if methods == "all":  # the methods of the first checkout; the second must have them too
                listing = "from cawbench.method import list_methods; print(','.join(list_methods()))"
                methods = subprocess.run([str(python), "-c", listing], check=True, capture_output=True,
                                         text=True).stdout.strip()  # fmt: skip
                args.methods = methods
            out = Path(tmp) / f"{name}.json"
            print(f"{name}: {tree} ({python})", flush=True)
            env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # leave the checkout's files alone
            subprocess.run([str(python), __file__, "--tree", "x=y", "--methods", methods, "--epochs",
                            str(args.epochs), "--worker", tree, str(out)], check=True, env=env)  # fmt: skip
            records[name] = json.loads(out.read_text())
    (first, a), (second, b) = records.items()
    report, failed = {}, False
    for case in sorted(k for k in set(a) | set(b) if not k.startswith("_")):
        diff = differences(a.get(case), b.get(case))
        report[case] = {"equal": not diff, "differences": diff[:20]}
        failed |= bool(diff)
        print(f"{case}: {'bit for bit equal' if not diff else f'{len(diff)} differences'}")
        for line in diff[:10]:
            print(f"    {line}")
    print(f"{first} vs {second}: {'every case equal' if not failed else 'DIFFERENT'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
