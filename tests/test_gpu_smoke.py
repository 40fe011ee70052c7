"""engine/configs/gpu_smoke.yaml, the preset a user runs on a new GPU cluster, end to end through
jobs/full.py on CPU: the same stages, methods and model classes (Stable Diffusion 1.5 and CLIP
ViT-L/14 built with seeded random weights), with the models scaled down by the random specs'
width and size options so that it fits two cores.

The default suite runs the method whose path only this preset exercises at paper settings
(clustered DreamBooth with prior preservation and class images, fp16 and gradient
checkpointing, fixed k); LoRA at the preset's rank is in `make test-slow`, with all six
methods, and the tiny model's LoRA path is tested in tests/test_finetune.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from engine.config import METHODS, load_config
from engine.generation_methods import method_names
from engine.resources import actor_resources, trial_bundle, use_gpu
from engine.stages.generate.shards import decode_png

ROOT = Path(__file__).resolve().parents[1]
SIDE = 64  # the scaled-down model's native side (512 px at full size)
CPU_OVERRIDES = [
    "model.device=cpu",  # every GPU share of the preset resolves to 0
    f"model.base=random:sd15:width=0.125:size={SIDE}",
    "model.encoder=random:clip-vit-l14:width=0.0625",  # its 224 px image tower: the costliest model here
    "train.image_size=32",  # ResNet-50 at 224 px is minutes per epoch on two cores
    "ray.num_cpus=2",
    "ray.dashboard=false",
]


def _gpu_asks(cfg) -> dict[str, float]:
    """The GPU share each stage of ``cfg`` asks Ray for, as the stages resolve it."""
    reachable = {"CPU": 16.0, "GPU": 1.0}
    asks = {s: actor_resources(cfg, s, 8, reachable).num_gpus for s in ("cluster", "generate", "filter")}
    asks["finetune"] = trial_bundle(cfg.finetune, cfg.model.device).get("GPU", 0.0)
    asks["train"] = float(use_gpu(cfg))
    return asks


def test_gpu_smoke_asks_every_stage_for_a_gpu_and_none_under_the_cpu_overrides():
    assert min(_gpu_asks(load_config("gpu_smoke")).values()) > 0
    assert max(_gpu_asks(load_config("gpu_smoke", CPU_OVERRIDES)).values()) == 0


# Minutes on two idle cores; a busy shared machine stretches that, hence the generous limit.
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("methods", [
    pytest.param(["clustered_dreambooth"], id="clustered"),
    pytest.param(list(METHODS), id="all-methods", marks=pytest.mark.slow),
])
def test_gpu_smoke_preset_runs_on_cpu(tmp_path, methods):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "jobs/full.py", "--config", "gpu_smoke", "--run-dir", str(run_dir)]
    for override in [*CPU_OVERRIDES, f"methods=[{','.join(methods)}]"]:
        cmd += ["--set", override]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    cfg = load_config("gpu_smoke", CPU_OVERRIDES)
    severity = run_dir / "severity-0.999"
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["model"]["base"] == cfg.model.base

    rows = json.loads((run_dir / "results.json").read_text())
    assert sorted(r["method"] for r in rows if r["method"] != "chance") == sorted(methods)
    assert (run_dir / "report.html").is_file() and f"report: {run_dir}/report.html" in proc.stdout

    gen = cfg.generate
    per_method = 4 * gen.images_per_group  # four groups, the two empty ones drawn from prompts
    for method in (m for m in method_names() if m in methods):
        shards = sorted((severity / "synthetic" / method).glob("part-*.parquet"))
        table = pq.read_table(shards).to_pandas() if shards else None
        assert len(shards) == per_method // gen.rows_per_shard, method
        assert len(table) == per_method and set(table["base_model"]) == {cfg.model.base}, method
        sides = {decode_png(png).shape for png in table["image"].head(4)}
        assert sides == {(SIDE, SIDE, 3)}, method  # the native side, not data.image_size (224)

    # Fine-tuned units: LoRA and DreamBooth one per group with real images, clustered
    # DreamBooth one per (group, cluster) with cluster.k = 2; the empty groups borrow.
    trained = {"lora": 2, "dreambooth": 2, "clustered_dreambooth": 4}
    for method, count in ((m, c) for m, c in trained.items() if m in methods):
        manifest = json.loads((severity / "finetune" / method / "manifest.json").read_text())
        owners = {u["unit"] for u in manifest["units"] if u["artifact"] and not u["borrowed_from"]}
        assert len(owners) == count, method
    class_images = sorted((severity / "finetune" / "class_images").glob("*.npy"))
    assert len(class_images) == 2  # one per class prompt, shared by both DreamBooth methods
    assert all(np.load(p).shape == (cfg.finetune.num_class_images, SIDE, SIDE, 3) for p in class_images)
