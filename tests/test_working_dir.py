"""`ray job submit --working-dir .` from a checkout that holds .git, .venv and runs: the package
Ray uploads, made by Ray's own packaging code as the job client makes it, holds the code and
leaves history, environments and outputs behind, far under Ray's upload limit."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEFT_BEHIND = (".git", ".venv", "runs")
MIB = 2**20


def pack_working_dir(folder: Path, include_gitignore: bool = True) -> tuple[int, list[str]]:
    """(bytes, member names) of the zip Ray uploads for ``--working-dir folder``: the job
    client's path (ray.dashboard.modules.dashboard_sdk), with its excludes and ignore files."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    packed = {}

    def upload(working_dir, excludes, is_file=False):
        target = Path(tempfile.mkdtemp()) / "package.zip"
        create_package(working_dir, target, include_gitignore=include_gitignore, excludes=excludes)
        packed["size"], packed["names"] = target.stat().st_size, zipfile.ZipFile(target).namelist()
        shutil.rmtree(target.parent)

    upload_working_dir_if_needed({"working_dir": str(folder)}, include_gitignore=include_gitignore, upload_fn=upload)
    return packed["size"], packed["names"]


@pytest.fixture(scope="module")
def busy_checkout(tmp_path_factory) -> Path:
    """The project's files with what a user's checkout also holds: a .git of 30 MiB of history,
    a .venv and a run's outputs of 40 MiB each (incompressible bytes, as packs and weights are)."""
    folder = tmp_path_factory.mktemp("checkout")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, target)
    for name, size in ((".git/objects/pack/pack-1.pack", 30), (".venv/lib/torch.so", 40),
                       ("runs/default/synthetic/lora/part-0.parquet", 40)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_noise(size * MIB))
    for name in (".rayignore", ".gitignore"):  # untracked in a checkout made before they were
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, folder / name)
    return folder


def _noise(n: int) -> bytes:
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()


def _top_level(names: list[str]) -> set[str]:
    return {name.split("/")[0] for name in names}


# The README's command as it is, and with neither Ray's default excludes (.git, .venv) nor
# .gitignore files (RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES='', RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1):
# the project's .rayignore does the job on its own.
@pytest.mark.parametrize("default_excludes, include_gitignore", [(True, True), (False, False)],
                         ids=["as-submitted", "rayignore-alone"])
def test_the_working_dir_leaves_history_environments_and_runs_behind(busy_checkout, monkeypatch,
                                                                      default_excludes, include_gitignore):
    if not default_excludes:
        monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    size, names = pack_working_dir(busy_checkout, include_gitignore)
    assert not _top_level(names) & set(LEFT_BEHIND), sorted(_top_level(names))
    assert {"engine", "jobs", "pyproject.toml"} <= _top_level(names)
    assert "engine/models/tiny_sd/unet/diffusion_pytorch_model.safetensors" in names
    assert "engine/configs/paper.yaml" in names
    assert size < 30 * MIB  # Ray refuses 100 MiB; the project's files are about 18 MiB


def test_this_checkout_packs_small(monkeypatch):
    """The checkout the tests run in, as `ray job submit --working-dir .` would pack it."""
    monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    size, names = pack_working_dir(ROOT)
    assert not _top_level(names) & set(LEFT_BEHIND)
    assert size < 30 * MIB
