"""Several seeds: one whole run per seed, and a report of mean ± std beside each seed's
figures (jobs/full.py --seeds, the ``seeds`` config key)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.config import SEEDED_SECTIONS, load_config
from engine.pipeline import seed_config
from engine.report import aggregate_seeds, results_markdown

ROOT = Path(__file__).resolve().parents[1]


def _row(method: str, wga: float, aga: float, fidelity: dict | None = None) -> dict:
    return {
        "method": method,
        "severity": 0.999,
        "test_worst_group": wga,
        "test_average_group": aga,
        "test_per_group": [aga, wga, wga, aga],
        "val_worst_group": wga,
        "val_average_group": aga,
        "val_per_group": [aga, wga, wga, aga],
        "synthetic_only_test_worst_group": wga / 2 if fidelity else None,
        "synthetic_only_test_average_group": aga / 2 if fidelity else None,
        "synthetic_images": 288 if fidelity else 0,
        "group_names": ["a", "b", "c", "d"],
        "synthetic_fidelity": fidelity,
        "stage_seconds": {"train": 10.0},
    }


def _fidelity(after: float, worst: float, unit: str) -> dict:
    return {
        "judge": "renderer", "before": after - 0.1, "after": after,
        "worst_unit_after": {"unit": unit, "after": worst},
        "per_unit": {unit: {"name": "landbird on water", "after": worst, "before": worst - 0.1,
                            "class_after": 1.0, "attribute_after": worst, "kept": 72, "images": 96}},
    }


def test_aggregate_is_mean_and_sample_std_over_seeds():
    per_seed = {
        0: [_row("erm", 0.10, 0.60), _row("lora", 0.50, 0.80, _fidelity(0.9, 0.7, "g1"))],
        1: [_row("erm", 0.20, 0.70), _row("lora", 0.70, 0.90, _fidelity(0.8, 0.5, "g2"))],
        2: [_row("erm", 0.30, 0.80), _row("lora", 0.60, 0.85, _fidelity(1.0, 0.9, "g1"))],
    }
    rows = {r["method"]: r for r in aggregate_seeds(per_seed)}
    erm, lora = rows["erm"], rows["lora"]
    assert erm["seeds"] == [0, 1, 2]
    assert erm["test_worst_group"] == pytest.approx(0.20)
    assert erm["test_worst_group_std"] == pytest.approx(0.10)  # sample std of 0.1, 0.2, 0.3
    assert erm["test_average_group"] == pytest.approx(0.70)
    assert erm["test_per_group"] == pytest.approx([0.70, 0.20, 0.20, 0.70])
    assert [r["test_worst_group"] for r in erm["per_seed"]] == [0.10, 0.20, 0.30]
    assert lora["test_worst_group"] == pytest.approx(0.60)
    assert lora["synthetic_fidelity"]["after"] == pytest.approx(0.9)
    assert lora["synthetic_fidelity"]["worst_unit_after"] == {"after": 0.5, "seed": 1, "unit": "g2"}
    assert erm["synthetic_fidelity"] is None

    assert lora["synthetic_only_test_worst_group"] == pytest.approx(0.30)
    assert math.isnan(erm["synthetic_only_test_worst_group"])

    table = results_markdown(list(rows.values()), "builtin")
    # val, then test, then test per group, each a mean ± std over the seeds.
    assert "| ERM | 20.0 ± 10.0 / 70.0 ± 10.0 | 20.0 ± 10.0 / 70.0 ± 10.0 | 70.0 / 20.0 / 20.0 / 70.0 | - |" in table
    assert "| LoRA | 60.0 ± 10.0 / 85.0 ± 5.0 | 60.0 ± 10.0 / 85.0 ± 5.0 | 85.0 / 60.0 / 60.0 / 85.0 | 30.0 / 42.5 |" in table
    # Each seed's figures beside the mean.
    assert "| ERM | 0.999 | 10.0 / 60.0 | 20.0 / 70.0 | 30.0 / 80.0 | 20.0 ± 10.0 / 70.0 ± 10.0 |" in table
    assert "worst unit 50.0 (seed 1)" in table
    # Per-unit fidelity names each seed's units.
    assert "| LoRA | 0.999 | 1 | g2 | landbird on water | 50.0 (40.0) |" in table


def test_one_seed_has_no_spread():
    rows = aggregate_seeds({4: [_row("erm", 0.25, 0.5)]})
    assert rows[0]["test_worst_group_std"] == 0.0
    assert math.isnan(aggregate_seeds({0: [_row("erm", math.nan, 0.5)]})[0]["test_worst_group"])


def test_seed_config_sets_every_stage_seed_and_the_data():
    cfg = load_config(None, ["seeds=[0,7]", "run_dir=/tmp/x"])
    sub = seed_config(cfg, 7)
    assert sub.run_dir == "/tmp/x/seed_7" and sub.seeds is None and sub.seed == 7
    assert all(getattr(sub, s).seed == 7 for s in SEEDED_SECTIONS)
    assert all(getattr(cfg, s).seed == 0 for s in SEEDED_SECTIONS)  # the parent keeps its own
    # Every stage's cache key, the data's included, moves with the seed.
    for section in SEEDED_SECTIONS:
        assert sub.slice_hash(section) != cfg.slice_hash(section)


def test_a_bare_seed_reaches_every_stage_and_the_data():
    from engine.stages.data.prepare import load_dataset

    cfg = load_config(None, ["seed=7"])
    assert all(getattr(cfg, s).seed == 7 for s in SEEDED_SECTIONS)
    small = ["data.builtin.n_train=40", "data.builtin.n_val=8", "data.builtin.n_test=8"]
    drawn = {s: load_dataset(load_config(None, [f"seed={s}", *small]).data).records["source"].tolist() for s in (0, 7)}
    assert drawn[0] != drawn[7]  # each seed draws its own world
    assert drawn[7] == load_dataset(load_config(None, ["seed=7", *small]).data).records["source"].tolist()


@pytest.mark.parametrize("key", ["train.seed", "cluster.seed", "data.builtin.seed", "data.split_seed"])
def test_a_stage_seed_of_its_own_is_refused(key):
    from engine.errors import FairsynthError

    with pytest.raises(FairsynthError, match="unknown key"):
        load_config(None, [f"{key}=3"])


@pytest.mark.parametrize("bad", ["seeds=[1,1]", "seeds=[]", "seeds=[-1]", "seeds=[a]"])
def test_bad_seeds_fail_at_load_naming_the_key(bad):
    from engine.errors import FairsynthError

    with pytest.raises(FairsynthError, match="seeds"):
        load_config(None, [bad])


# Slow (a minute and more): the aggregation tests above cover the arithmetic; this one the job.
@pytest.mark.slow
@pytest.mark.timeout(1200)  # two Ray Train fits: about a minute each on 2 idle cores, more when shared
def test_full_job_with_seeds_reports_each_seed_and_their_mean(tmp_path):
    """jobs/full.py --seeds on ERM at a tiny size: a run per seed, each with its own data, and
    root results equal to the mean of the seeds' own results."""
    run = tmp_path / "run"
    cmd = [
        sys.executable, str(ROOT / "jobs/full.py"), "--run-dir", str(run), "--seeds", "0,1",
        "--set", "methods=[erm]", "--set", "severities=[0.9]",
        "--set", "data.builtin.n_train=160", "--set", "data.builtin.n_val=40", "--set", "data.builtin.n_test=40",
        "--set", "train.epochs=2", "--set", "train.batch_size=32", "--set", "train.num_workers=1",
        "--set", "ray.num_cpus=2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = {r["method"]: r for r in json.loads((run / "results.json").read_text())}
    assert set(rows) == {"erm"}
    for method, row in rows.items():
        own = [
            next(r for r in json.loads((run / f"seed_{s}/results.json").read_text()) if r["method"] == method)
            for s in (0, 1)
        ]
        wga = [r["test_worst_group"] for r in own]
        assert row["seeds"] == [0, 1]
        assert [r["test_worst_group"] for r in row["per_seed"]] == wga
        assert row["test_worst_group"] == pytest.approx(sum(wga) / 2)
        assert row["test_worst_group_std"] == pytest.approx(abs(wga[0] - wga[1]) / math.sqrt(2))
    for s in (0, 1):
        saved = yaml.safe_load((run / f"seed_{s}/config.yaml").read_text())
        assert saved["seed"] == s and saved["seeds"] is None
    # Each seed drew its own data.
    records = [(run / f"seed_{s}/severity-0.9/data/records.parquet").read_bytes() for s in (0, 1)]
    assert records[0] != records[1]
    table = (run / "results.md").read_text()
    assert "± " in table and "seed 0" in table and "seed 1" in table
    assert "± " in proc.stdout
