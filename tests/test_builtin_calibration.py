"""The built-in benchmark's renderings (data.builtin.rendering) and the calibration benchmark
that measures them (benchmarks/research/benchmark_calibration.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.config import load_config
from engine.errors import FairsynthError
from engine.stages.data import builtin
from engine.stages.data.datasets import load_image
from engine.stages.data.prepare import load_dataset
from engine.stages.generate.fidelity import read_renderer_image

ROOT = Path(__file__).resolve().parents[1]


def _pairs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield builtin.OBJECTS[rng.integers(len(builtin.OBJECTS))], builtin.BACKGROUNDS[rng.integers(len(builtin.BACKGROUNDS))], int(rng.integers(2**31 - 1))


def test_records_carry_the_rendering_and_load_image_draws_it():
    calibrated = load_dataset(load_config(None, ["data.builtin.rendering=calibrated", "data.builtin.n_train=40"]).data)
    classic = load_dataset(load_config(None, ["data.builtin.rendering=classic", "data.builtin.n_train=40"]).data)
    # The same objects, backgrounds and seeds; only the drawing differs.
    assert calibrated.records["label"].tolist() == classic.records["label"].tolist()
    for a, b in zip(calibrated.records["source"][:8], classic.records["source"][:8], strict=True):
        assert a.endswith("/calibrated") and not b.endswith("/calibrated")
        obj, bg, seed = b[len(builtin.BUILTIN_SCHEME):].split("/")
        assert np.array_equal(load_image(a, 32), builtin.render(obj, bg, int(seed), "benchmark", 32, "calibrated"))
        assert np.array_equal(load_image(b, 32), builtin.render(obj, bg, int(seed), "benchmark", 32))
        assert not np.array_equal(load_image(a, 32), load_image(b, 32))


def test_the_default_benchmark_is_the_calibrated_one():
    """The dataset every default run trains on; render() untold still draws classic images."""
    assert load_config().data.builtin.rendering == "calibrated"
    assert all(s.endswith("/calibrated") for s in load_dataset(load_config(None, ["data.builtin.n_train=40"]).data).records["source"])
    assert np.array_equal(builtin.render("gull", "forest", 2), builtin.render("gull", "forest", 2, rendering="classic"))


def test_unknown_rendering_fails_at_load_naming_the_valid_ones():
    with pytest.raises(FairsynthError, match="data.builtin.rendering.*classic, calibrated"):
        load_config(None, ["data.builtin.rendering=hard"])


def test_shared_palette_leaves_only_shape_to_tell_the_class():
    assert builtin.RENDERINGS["calibrated"].shared_palette
    for water, land in builtin.PALETTE_PARTNER.items():
        assert builtin.OBJECT_CLASS[water] == 1 and builtin.OBJECT_CLASS[land] == 0
        for rendering, same_colour in (("calibrated", True), ("classic", False)):
            # One seed: the same background, placement, jitter and noise; the two shapes overlap,
            # and where they do, the pixels are equal exactly when the colours are.
            a = builtin.render(water, "lake", 7, "benchmark", 32, rendering)
            b = builtin.render(land, "lake", 7, "benchmark", 32, rendering)
            differ = (a != b).any(axis=2).sum()
            u, v = _local(rendering)
            both = builtin._object_mask(water, u, v) & builtin._object_mask(land, u, v)
            assert both.sum() > 20 and differ > 0  # the shapes overlap, and differ
            assert (a[both] == b[both]).all() == same_colour
    # The base style (the generator's corpus) is drawn one way whatever the rendering.
    for obj, bg, seed in _pairs(12, 1):
        assert np.array_equal(builtin.render(obj, bg, seed, "base", 32, "calibrated"), builtin.render(obj, bg, seed, "base", 32))


def test_an_address_without_a_rendering_names_a_classic_image():
    address = builtin.source_address("heron", "ocean", 11, "classic")
    assert address == "builtin://heron/ocean/11"  # as every run before renderings wrote it
    assert np.array_equal(builtin.render_address(address, 32), builtin.render("heron", "ocean", 11, "benchmark", 32, "classic"))


def _local(rendering: str, seed: int = 7, size: int = 32):
    """The object's local coordinates (u, v), drawn as render() draws them on a lake."""
    r = builtin.RENDERINGS[rendering]
    rng = np.random.default_rng(seed)
    builtin._background("lake", "benchmark", rng, size)
    cx, cy = rng.uniform(*r.centre, size=2) * size
    scale = rng.uniform(*r.scale) * size
    angle = rng.uniform(-r.angle, r.angle)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = (xx - cx) / scale, (yy - cy) / scale
    return np.cos(angle) * dx + np.sin(angle) * dy, -np.sin(angle) * dx + np.cos(angle) * dy


@pytest.mark.parametrize("rendering", list(builtin.RENDERINGS))
def test_renderer_judge_reads_every_rendering(rendering):
    """The fidelity judge (class by shape, attribute by background colour) reads real renders
    of every rendering right, so it can judge generated images of any (the figures on 8,000
    each: engine/stages/generate/fidelity.py's docstring)."""
    right = []
    for obj, bg, seed in _pairs(600, 5):
        label, attribute = read_renderer_image(builtin.render(obj, bg, seed, "benchmark", 32, rendering))
        right.append(label == builtin.OBJECT_CLASS[obj] and attribute == builtin.BACKGROUND_ATTRIBUTE[bg])
    assert np.mean(right) >= 0.985


def test_calibration_benchmark_prints_targets_as_json():
    """The benchmark's own entry point at a toy size (not a calibration): one seed, one epoch."""
    cmd = [
        sys.executable, str(ROOT / "benchmarks/research/benchmark_calibration.py"), "--rendering", "calibrated", "--seeds", "0",
        "--set", "data.builtin.n_train=120", "--set", "data.builtin.n_val=40", "--set", "data.builtin.n_test=40",
        "--set", "train.epochs=1",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rendering"] == "calibrated" and result["seeds"] == [0]
    assert set(result["means"]) == {"erm", "group_dro"}
    assert set(result["means"]["erm"]) == {"original", "0.999"}
    assert len(result["targets"]) == 4 and result["all_met"] == all(result["targets"].values())
    for method in ("erm", "group_dro"):
        for severity, mean in result["means"][method].items():
            assert 0.0 <= mean <= 100.0 and result["per_seed"][method][severity] == [round(mean, 1)]
