"""benchmarks/research/baseline_search.py reads back only the trials run under the same settings."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("baseline_search", ROOT / "benchmarks/research/baseline_search.py")
search = importlib.util.module_from_spec(spec)
sys.modules["baseline_search"] = search
spec.loader.exec_module(search)


def _args(*extra):
    return search.parse_args(["--run-dir", "runs/x", "--seeds", "100,101", *extra])


def test_a_trial_is_keyed_by_the_settings_it_ran_under():
    base = search.result_key(_args(), 0, 100)
    assert base == search.result_key(_args(), 0, 100)
    others = {search.result_key(_args(*extra), 0, 100) for extra in
              (["--set", "train.epochs=2"], ["--severity", "0.99"], ["--config", "paper"])}
    assert base not in others and len(others) == 3
    assert search.result_key(_args(), 1, 100) != base != search.result_key(_args(), 0, 101)
    # The same settings spelled another way are the same settings.
    assert search.result_key(_args("--config", "tiny", "--severity", "0.9990"), 0, 100) == base
    two = ["--set", "train.epochs=2", "--set", "train.learning_rate=0.01"]
    assert search.result_key(_args(*two), 0, 100) == search.result_key(_args(*two[2:], *two[:2]), 0, 100)


def test_choose_reads_only_this_settings_trials():
    args = _args("--methods", "erm")
    row = {"values": {"learning_rate": 1e-3}, "val_worst_group": 0.5, "val_average_group": 0.6}
    elsewhere = {search.result_key(_args("--methods", "erm", "--set", "train.epochs=2"), 0, s): {"erm": row}
                 for s in (100, 101)}
    with pytest.raises(Exception, match="no finished trial of erm"):
        search.choose(elsewhere, args, trials=1)
    here = {search.result_key(args, 0, s): {"erm": row} for s in (100, 101)}
    assert search.choose(here, args, trials=1)["erm"]["chosen"]["val_worst_group"] == 0.5
