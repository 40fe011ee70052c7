"""Tests run offline on 2 CPU cores: no hub access, small thread pools."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
# A test starts its own Ray (address="local", or a head of its own); a RAY_ADDRESS left in the
# shell would send its jobs to someone else's cluster.
os.environ.pop("RAY_ADDRESS", None)

ROOT = Path(__file__).resolve().parents[1]

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _ray_address_put_back():
    """A local Ray a test starts names itself in RAY_ADDRESS (engine.raylib); a later test's
    job would inherit it and wait for that Ray, shut down since."""
    before = os.environ.get("RAY_ADDRESS")
    yield
    if before is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = before


# A finished run's files (results, plots, a grid, timings, config) as jobs/full.py lays them
# out, written by the engine's own writers from made-up metrics: for the report and trackers.
GROUPS = ["landbird / land", "landbird / water", "waterbird / land", "waterbird / water"]


def _metrics(rng: np.random.Generator) -> dict:
    per_group = [round(float(v), 4) for v in rng.uniform(0, 1, 4)]
    split = {"worst_group": min(per_group), "average_group": float(np.mean(per_group)), "per_group": per_group}
    return {"test": split, "val": split, "synthetic_images": 16, "group_names": GROUPS}


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """A finished run's files as jobs/full.py lays them out, written by the engine's own writers."""
    from engine.config import load_config
    from engine.report import collect_rows, write_results
    from engine.runs import RunDir
    from engine.stages.data.stage import run_data_stage
    from engine.stages.generate.grids import render_grid

    root = tmp_path_factory.mktemp("run")
    cfg = load_config("tiny", ["methods=[erm,group_dro,lora]", "data.severity=0.999"])
    (root / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    rng = np.random.default_rng(0)
    sub = root / "severity-0.999"
    run_data_stage(cfg, RunDir(sub))  # the chance row reads the splits' group sizes
    for method in cfg.methods:
        (sub / "train" / method).mkdir(parents=True)
        (sub / "train" / method / "metrics.json").write_text(json.dumps(_metrics(rng)))
    seconds = {"0.999": {m: {"data": 0.1, "cluster": 12.0, "train": 40.0 + i} for i, m in enumerate(cfg.methods)}}
    (root / "stage_seconds.json").write_text(json.dumps(seconds))
    write_results(root, collect_rows(root, [0.999], cfg.methods, seconds), "builtin")
    tiles = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    (root / "grids").mkdir()
    render_grid([("g0\nlandbird / land", tiles, [True, False, True])], cell=64).save(root / "grids" / "severity-0.999_lora.png")
    return root
