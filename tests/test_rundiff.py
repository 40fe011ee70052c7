"""engine.rundiff on run folders written here: it finds each kind of difference and damage the
chaos benchmark and the fault tests rely on it to find, and nothing in two equal runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine import rundiff

EXP = "severity-0.95"


def _write_run(root: Path) -> Path:
    exp = root / EXP
    synthetic = exp / "synthetic" / "lora"
    synthetic.mkdir(parents=True)
    rows = pd.DataFrame({"unit": ["g0", "g0", "g1", "g1"], "seed": [0, 1, 0, 1], "image": [b"a", b"b", b"c", b"d"],
                         "score": [0.1, 0.2, 0.3, 0.4], "kept": [True, False, True, True]})
    rows[:2].to_parquet(synthetic / "part-x-00000.parquet")
    rows[2:].to_parquet(synthetic / "part-x-00001.parquet")
    (synthetic / "_summary.json").write_text(json.dumps({"shards": 2, "images": 4}))
    (synthetic / "_COMPLETE.json").write_text("{}")
    units = exp / "finetune" / "lora" / "units" / "g0"
    units.mkdir(parents=True)
    from safetensors.numpy import save_file

    save_file({"w": np.arange(6, dtype=np.float32)}, str(units / "weights.safetensors"))
    (units / "unit.json").write_text("{}")
    (exp / "finetune" / "lora" / "manifest.json").write_text(json.dumps({"units": [{"artifact": "finetune/lora/units/g0"}]}))
    train = exp / "train" / "lora"
    train.mkdir(parents=True)
    metrics = {"test_wga": 0.5, "stage_seconds": 12.0, "epochs": [{"loss": 1.0, "epoch_seconds": 3.0}]}
    (train / "metrics.json").write_text(json.dumps(metrics))
    (train / "_COMPLETE.json").write_text("{}")
    return root


@pytest.fixture
def runs(tmp_path):
    reference = _write_run(tmp_path / "reference")
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run, reference


def test_equal_runs_differ_only_in_clocks(runs):
    run, reference = runs
    metrics = run / EXP / "train" / "lora" / "metrics.json"
    slower = json.loads(metrics.read_text()) | {"stage_seconds": 99.0}
    slower["epochs"][0]["epoch_seconds"] = 7.0
    metrics.write_text(json.dumps(slower))
    assert rundiff.differences(str(run), str(reference)) == []
    assert rundiff.damage(str(run)) == []


def test_a_changed_image_filter_choice_tensor_or_metric_is_found(runs):
    run, reference = runs
    shard = run / EXP / "synthetic" / "lora" / "part-x-00001.parquet"
    frame = pd.read_parquet(shard)
    frame.loc[frame.index[0], "kept"] = False
    frame.to_parquet(shard)
    from safetensors.numpy import save_file

    save_file({"w": np.ones(6, dtype=np.float32)}, str(run / EXP / "finetune/lora/units/g0/weights.safetensors"))
    metrics = run / EXP / "train" / "lora" / "metrics.json"
    metrics.write_text(json.dumps(json.loads(metrics.read_text()) | {"test_wga": 0.25}))
    found = rundiff.differences(str(run), str(reference))
    assert any("columns ['kept'] differ" in line for line in found), found
    assert any("tensors differ" in line for line in found), found
    assert any("metrics.json: differs" in line for line in found), found


def test_a_missing_shard_is_a_difference_and_damage(runs):
    run, reference = runs
    (run / EXP / "synthetic" / "lora" / "part-x-00001.parquet").unlink()
    assert any("shards" in line for line in rundiff.differences(str(run), str(reference)))
    assert any("summary says 2 and 4" in line for line in rundiff.damage(str(run)))


def test_half_written_files_rows_counted_twice_and_missing_records_are_damage(runs):
    run, _ = runs
    synthetic = run / EXP / "synthetic" / "lora"
    (synthetic / ".part-x-00002.parquet.abc.tmp").write_bytes(b"half")
    frame = pd.read_parquet(synthetic / "part-x-00000.parquet")
    frame.assign(seed=[0, 0]).to_parquet(synthetic / "part-x-00000.parquet")
    (run / EXP / "finetune/lora/units/g0/unit.json").unlink()
    (run / EXP / "train/lora/metrics.json").unlink()
    found = rundiff.damage(str(run))
    assert any(line.startswith("half-written:") for line in found), found
    assert any("written twice" in line for line in found), found
    assert any("without its unit.json" in line for line in found), found
    assert any("without metrics.json" in line for line in found), found


def test_an_output_only_the_disturbed_run_has_is_a_difference(runs):
    run, reference = runs
    shutil.copytree(run / EXP / "synthetic" / "lora", run / EXP / "synthetic" / "dreambooth")
    shutil.copytree(run / EXP, run / "severity-0.99")
    found = rundiff.differences(str(run), str(reference))
    assert f"{EXP}/synthetic/dreambooth/_COMPLETE.json: not in the reference" in found, found
    assert "severity-0.99/train/lora/metrics.json: not in the reference" in found, found


def test_a_folder_marked_complete_without_its_summary_is_damage(runs):
    run, _ = runs
    (run / EXP / "synthetic" / "lora" / "_summary.json").unlink()
    assert rundiff.damage(str(run)) == [f"{EXP}/synthetic/lora: marked complete without _summary.json"]
