"""The results table: whole-line appends (a torn previous line, concurrent writers) and a reader that names
a bad line instead of failing on it."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from cawbench.results import ResultsFileError, append_result, read_results


def test_append_after_a_torn_line_starts_on_a_new_line(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    append_result(path, {"run": 1})
    with open(path, "a") as fh:
        fh.write('{"run": 2, "final_te')  # a writer killed mid-row
    append_result(path, {"run": 3})
    lines = path.read_text().splitlines()
    assert lines == ['{"run": 1}', '{"run": 2, "final_te', '{"run": 3}']
    assert read_results(path) == [{"run": 1}, {"run": 3}]  # the earlier row intact, the new one whole
    err = capsys.readouterr().err
    assert f"cawbench: warning: {path}, line 2: not valid JSON" in err and "line skipped" in err


def test_strict_reader_names_file_and_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"run": 1}\n\n[1, 2]\n')
    with pytest.raises(
        ResultsFileError, match=rf"{path}, line 3: a JSON list, not an object; repair or delete"
    ):
        read_results(path, strict=True)
    assert read_results(path, warn=False) == [{"run": 1}]


def _append_many(path: str, worker: int, n: int) -> None:
    for i in range(n):  # rows far larger than PIPE_BUF: only the lock keeps them whole
        append_result(path, {"worker": worker, "i": i, "pad": "x" * 20_000})


def test_concurrent_writers_lose_and_tear_nothing(tmp_path):
    path = tmp_path / "results.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line parses
    assert sorted((r["worker"], r["i"]) for r in rows) == [(w, i) for w in range(4) for i in range(40)]
