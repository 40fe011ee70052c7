"""benchmarks/run_all.py: a benchmark that fails or misses its target makes the run fail."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
run_all = importlib.util.module_from_spec(spec)
sys.modules["run_all"] = run_all  # dataclasses look their module up while the file runs
spec.loader.exec_module(run_all)


def test_every_script_is_listed_and_targets_read_both_ways():
    # gpu_smoke_run needs a GPU machine (benchmarks/device); the baseline search and the
    # judges read a finished multi-method run the user names, and have no target to meet.
    tools = {"run_all", "gpu_smoke_run", "baseline_search", "judges"}
    scripts = {p.relative_to(ROOT / "benchmarks") for p in (ROOT / "benchmarks").glob("**/*.py")}
    listed = {b.script.relative_to(ROOT / "benchmarks") for b in run_all.BENCHMARKS}
    assert {s for s in scripts if s.stem not in tools and s.parts[0] != "device"} == listed
    assert all(b.script.exists() for b in run_all.BENCHMARKS)
    higher, lower = run_all.Benchmark("a", "higher"), run_all.Benchmark("b", "lower")
    assert higher.met({"value": 0.9, "target": 0.85}) and not higher.met({"value": 0.8, "target": 0.85})
    assert lower.met({"value": 0.4, "target": 0.5}) and not lower.met({"value": 0.6, "target": 0.5})
    assert run_all.Benchmark("c", "higher", target=1.0).met({"value": 0.97, "target": ">= 1"}) is False
    assert run_all.Benchmark("d", None).met({"value": 3, "target": None}) is None
    assert higher.met({"all_met": False, "value": None}) is False


@pytest.mark.parametrize("result, code", [
    (({"benchmark": "x", "value": 2.0, "target": 1.0}, ""), 0),
    (({"benchmark": "x", "value": 0.5, "target": 1.0}, ""), 1),
    ((None, "exit 1"), 1),
])
def test_exit_code_follows_failures_and_misses(monkeypatch, tmp_path, result, code):
    monkeypatch.setattr(run_all, "run_one", lambda bench, quick: result)
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--only", "train_throughput"])
    try:
        run_all.main()
        exit_code = 0
    except SystemExit as stop:
        exit_code = stop.code
    assert exit_code == code
    if result[0] is not None:
        assert json.loads((tmp_path / "results" / "train_throughput.json").read_text())["met"] is (code == 0)


def test_unknown_benchmark_is_one_line_and_exit_2():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/run_all.py"), "--only", "nope"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "unknown benchmark 'nope'" in out.stderr
