"""The project as a package: the wheel built from the tracked files ships the presets and
every model file a run reads, and installed into a fresh virtual environment outside the
checkout, its `fairsynth` command plans a paper preset and runs the tiny job from a folder
that holds nothing of the project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRACKED_MODEL_FILES = ("engine/models/", "engine/configs/")


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the tracked files (a build writes build/ and
    *.egg-info into the tree it builds), without build isolation: no network."""
    source = tmp_path_factory.mktemp("source")
    for name in _tracked():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(source)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    (built,) = out.glob("fairsynth-*.whl")
    return built


def test_the_wheel_ships_presets_model_files_and_the_command(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [n for n in _tracked() if n.startswith(TRACKED_MODEL_FILES) and not n.endswith(".py")]
    assert "engine/configs/tiny.yaml" in shipped and "engine/models/tiny_sd/unet/config.json" in shipped
    assert sorted(set(shipped) - names) == []
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "fairsynth = engine.commands:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert not any(n.startswith(("jobs/", "tests/", "benchmarks/")) for n in names)


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed; its dependencies (torch, Ray, ...)
    come from this interpreter's site-packages through a .pth, as a pip install would put them
    there (installing torch anew takes minutes)."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # --ignore-installed: this interpreter's own (editable) fairsynth is neither reused nor removed.
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--ignore-installed",
         "--no-index", "--quiet", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return venv


def _fairsynth(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "TQDM_DISABLE")}
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([str(venv / "bin" / "fairsynth"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow  # about 2 minutes on 2 shared cores: a plan of a paper preset and a Ray Train fit
@pytest.mark.timeout(1500)
def test_the_installed_command_plans_and_runs_outside_the_checkout(installed, tmp_path):
    where = subprocess.run([str(installed / "bin" / "python"), "-c", "import engine; print(engine.__file__)"],
                           cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(installed) and not Path(where).is_relative_to(ROOT)

    plan = _fairsynth(installed, tmp_path, "plan", "--config", "waterbirds_0999", "--gpus", "8", "--gpu-type", "h100",
                      "--json")
    assert plan.returncode == 0, plan.stderr[-3000:]
    planned = json.loads(plan.stdout)
    assert planned["config"] == "waterbirds_0999" and planned["total"]["flops"] > 0

    run = _fairsynth(
        installed, tmp_path, "run", "--set", "methods=[erm]", "--set", "severities=[0.9]",
        "--set", "data.builtin.n_train=160", "--set", "data.builtin.n_val=40", "--set", "data.builtin.n_test=40",
        "--set", "train.epochs=1", "--set", "train.batch_size=32", "--set", "train.num_workers=1",
        "--set", "ray.num_cpus=2",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "runs" / "default" / "results.json").read_text())
    assert [r["method"] for r in rows if r["method"] != "chance"] == ["erm"]
    assert (tmp_path / "runs" / "default" / "report.html").exists()
