"""jobs/pretrain_tiny.py, the job that makes the shipped tiny models: bad input is one line and
exit code 2; the smoke run ships a tiny SD that loads offline and samples, and a tiny CLIP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine.errors import FairsynthError
from engine.models.pretrain import PretrainSettings, run_pretraining

ROOT = Path(__file__).resolve().parents[1]


def _job(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "jobs/pretrain_tiny.py"), *args],
                          capture_output=True, text=True, timeout=1200, env=env)


def test_an_unknown_phase_fails_in_one_line():
    out = _job("--phases", "vae,foo")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: phases: unknown phase(s) ['foo']; expected a subset of vae,unet,clip,judge"]


def test_the_unet_phase_without_a_trained_vae_names_the_phase_to_run(tmp_path):
    settings = PretrainSettings(phases=("unet",), work_dir=tmp_path, corpus_size=8, out_sd=tmp_path / "sd")
    with pytest.raises(FairsynthError, match=r"needs a trained VAE in .*; run --phases vae first"):
        run_pretraining(settings)
    assert not (tmp_path / "sd").exists()


def test_smoke_settings_shrink_every_phase_and_keep_a_given_work_dir(tmp_path):
    smoke = PretrainSettings(vae_steps=99).smoke()
    assert (smoke.vae_steps, smoke.unet_steps, smoke.clip_steps, smoke.judge_steps, smoke.corpus_size) == (4, 4, 4, 4, 256)
    assert smoke.work_dir == Path("runs/pretrain_tiny_smoke")
    assert smoke.out_judge == Path("runs/pretrain_tiny_smoke/judge")  # never the shipped judge
    assert PretrainSettings(work_dir=tmp_path).smoke().work_dir == tmp_path


@pytest.mark.slow
def test_smoke_run_ships_models_that_load_and_a_rerun_reuses_the_vae(tmp_path):
    from diffusers import StableDiffusionPipeline

    from engine.models.encoders import TinyClipEncoder

    paths = ["--out-sd", str(tmp_path / "sd"), "--out-clip", str(tmp_path / "clip"), "--out-judge", str(tmp_path / "judge"),
             "--work-dir", str(tmp_path / "work")]
    out = _job("--smoke", *paths)
    assert out.returncode == 0, out.stderr
    stats = {line.split(": ", 1)[0]: json.loads(line.split(": ", 1)[1]) for line in out.stdout.splitlines()[:4]}
    assert stats["vae"]["steps"] == stats["unet"]["steps"] == stats["clip"]["steps"] == stats["judge"]["steps"] == 4
    assert (tmp_path / "judge/model.safetensors").is_file()
    assert json.loads((tmp_path / "sd/pretrain.json").read_text())["corpus_size"] == 256
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", safety_checker=None, local_files_only=True)
    image = pipe("a photo of a cat", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    encoder = TinyClipEncoder(tmp_path / "clip")
    embeddings = np.asarray(encoder.encode_images(np.zeros((2, 32, 32, 3), np.uint8)))
    assert embeddings.shape == (2, encoder.dim) and np.isfinite(embeddings).all()

    again = _job("--smoke", "--phases", "vae", *paths)
    assert again.returncode == 0 and json.loads(again.stdout.splitlines()[0].split(": ", 1)[1]) == stats["vae"]


def test_continued_pretraining_starts_from_the_given_model_and_keeps_its_lineage(tmp_path):
    """--init-from reuses the model's VAE (and its latent scaling) and starts the UNet and text
    encoder from its weights: one step at a negligible learning rate leaves them as they were."""
    import torch
    from diffusers import UNet2DConditionModel

    from engine.models.tiny import tiny_model_path

    shipped = tiny_model_path()
    settings = replace(PretrainSettings(phases=("vae", "unet"), init_from=shipped, out_sd=tmp_path / "sd",
                                        work_dir=tmp_path / "work").smoke(),
                       corpus_size=32, unet_steps=1, unet_lr=1e-12)
    stats = run_pretraining(settings)
    assert stats["vae"]["steps"] == 0 and stats["vae"]["reused_from"] == str(shipped)
    info = json.loads((tmp_path / "sd" / "pretrain.json").read_text())
    assert info["continued_from"] == json.loads((shipped / "pretrain.json").read_text())
    assert info["vae"]["scaling_factor"] == info["continued_from"]["vae"]["scaling_factor"]
    before = UNet2DConditionModel.from_pretrained(shipped / "unet").state_dict()
    after = UNet2DConditionModel.from_pretrained(tmp_path / "sd" / "unet").state_dict()
    for name, weight in before.items():
        torch.testing.assert_close(after[name], weight, atol=1e-6, rtol=0)


def test_continuing_from_a_folder_without_a_model_is_one_line(tmp_path):
    out = _job("--phases", "vae,unet", "--init-from", str(tmp_path), "--work-dir", str(tmp_path / "w"),
               "--out-sd", str(tmp_path / "sd"), "--smoke")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: init_from: {tmp_path} has no vae/ folder; give a tiny SD folder such as "
        f"{ROOT / 'engine/models/tiny_sd'}"]
