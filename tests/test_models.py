"""The models layer: offline tokenizer, the shipped tiny Stable Diffusion, loading policy, encoders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.errors import FairsynthError
from engine.models.encoders import ClipEncoder, TinyClipEncoder, load_encoder
from engine.models.loading import load_pipeline
from engine.models.tiny import tiny_clip_path, tiny_model_path
from engine.models.tokenizer import build_clip_tokenizer
from engine.stages.data.builtin import caption, render

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def tiny_pipe():
    return load_pipeline("tiny", device="cpu")


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_matches_openai_clip_ids(tokenizer):
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert len(tokenizer) == 49408
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 49407
    padded = tokenizer("", padding="max_length", max_length=77).input_ids
    assert padded == [49406] + [49407] * 76


def test_tokenizer_agrees_with_open_clip(tokenizer):
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    texts = ["a photo of a cat", caption("heron", "lake"), "A photo of a Blond MALE person!",
             "don't 123 photos, of   waterbirds"]
    for text in texts:
        expected = [49406] + reference.encode(text) + [49407]
        assert tokenizer(text).input_ids == expected, text


def test_shipped_tokenizer_folder_loads_offline(monkeypatch):
    from transformers import CLIPTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tiny_model_path() / "tokenizer"
    assert {"vocab.json", "merges.txt"} <= {p.name for p in folder.iterdir()}
    assert CLIPTokenizer.from_pretrained(folder)("a photo of a cat").input_ids == CAT_IDS


# --------------------------------------------------------------------------- tiny SD


def test_shipped_tiny_sd_is_small_safetensors_only():
    folder = tiny_model_path()
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    weights = [p for p in files if p.suffix in {".safetensors", ".bin", ".ckpt", ".pt", ".pth"}]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert all(p.suffix == ".safetensors" for p in weights)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_tiny_sd_samples_offline_with_plain_diffusers(monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path(), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    prompts = [caption("sparrow", "forest"), caption("heron", "lake")]
    gens = [torch.Generator().manual_seed(0) for _ in prompts]  # the same starting noise
    out = pipe(prompts, num_inference_steps=10, guidance_scale=6.0, generator=gens,
               output_type="np").images
    assert out.shape == (2, 32, 32, 3)
    assert np.isfinite(out).all()
    assert out.std(axis=(1, 2, 3)).min() > 0.05  # not a constant image
    assert np.abs(out[0] - out[1]).mean() > 0.05  # the prompt changes the picture


def test_load_pipeline_tiny_on_cpu(tiny_pipe):
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert isinstance(tiny_pipe, StableDiffusionPipeline)
    assert tiny_pipe.safety_checker is None
    assert tiny_pipe.unet.dtype == torch.float32 and tiny_pipe.device.type == "cpu"
    assert all(isinstance(p, AttnProcessor2_0) for p in tiny_pipe.unet.attn_processors.values())


# --------------------------------------------------------------------------- load errors


def test_load_pipeline_missing_path():
    with pytest.raises(FairsynthError, match="does not exist"):
        load_pipeline("/nonexistent/fairsynth/model", device="cpu")


def test_load_pipeline_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(FairsynthError, match="model_index.json"):
        load_pipeline(str(tmp_path), device="cpu")


def test_load_pipeline_refuses_pickle_only_weights(tmp_path, tiny_pipe):
    folder = tmp_path / "pickled"
    tiny_pipe.save_pretrained(folder, safe_serialization=False)
    assert not list((folder / "unet").glob("*.safetensors"))
    assert list((folder / "unet").glob("*.bin"))
    with pytest.raises(FairsynthError, match="pickle"):
        load_pipeline(str(folder), device="cpu")
    # Trusted explicitly, the same folder loads.
    pipe = load_pipeline(str(folder), device="cpu", allow_pickle=True)
    assert pipe.unet.config.sample_size == tiny_pipe.unet.config.sample_size


def test_load_pipeline_bad_arguments(tmp_path, monkeypatch):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(FairsynthError, match="is a file"):
        load_pipeline(str(weights), device="cpu")
    with pytest.raises(FairsynthError, match="attention backend"):
        load_pipeline("tiny", device="cpu", attention="flash")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FairsynthError, match="not in the local Hugging Face cache"):
        load_pipeline("fairsynth-test/not-a-model", device="cpu")


def test_xformers_missing_is_a_clear_error():
    import importlib.util

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed")
    with pytest.raises(FairsynthError, match="xformers is not installed"):
        load_pipeline("tiny", device="cpu", attention="xformers")


# --------------------------------------------------------------------------- encoders


def test_tiny_encoder_embeddings():
    enc = load_encoder("tiny")
    assert isinstance(enc, TinyClipEncoder) and enc.device == "cpu"
    pairs = [("sparrow", "forest"), ("heron", "lake"), ("gull", "desert")]
    images = np.stack([render(o, b, 3, "benchmark") for o, b in pairs])
    img = enc.encode_images(images)
    txt = enc.encode_texts([caption(o, b) for o, b in pairs])
    for emb in (img, txt):
        assert emb.shape == (3, enc.dim) and emb.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.abs(txt[0] - txt[1]).max() > 1e-3
    # Each image is closest to its own caption.
    assert (np.argmax(img @ txt.T, axis=1) == np.arange(3)).all()
    # Another image size is resized, not refused.
    assert enc.encode_images(np.zeros((2, 64, 64, 3), np.uint8)).shape == (2, enc.dim)


def test_encoder_errors():
    with pytest.raises(FairsynthError, match="does not exist"):
        load_encoder("/nonexistent/clip")
    with pytest.raises(FairsynthError, match="uint8"):
        load_encoder("tiny").encode_images(np.zeros((2, 32, 32, 3), np.float32))
    assert (tiny_clip_path() / "model.safetensors").is_file()


def test_clip_encoder_from_local_folder(tmp_path, tokenizer, monkeypatch):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=49408, max_position_embeddings=77,
                                         eos_token_id=49407, bos_token_id=49406, pad_token_id=49407),
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                           crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(tmp_path / "clip")
    enc = load_encoder(str(tmp_path / "clip"), device="cpu")
    assert isinstance(enc, ClipEncoder) and enc.dim == 16
    img = enc.encode_images(np.stack([render("duck", "ocean", s, "benchmark") for s in range(3)]))
    txt = enc.encode_texts([caption("duck", "ocean"), caption("crow", "desert")])
    assert img.shape == (3, 16) and txt.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    assert np.abs(txt[0] - txt[1]).max() > 1e-4


# --------------------------------------------------------------------------- random paper shapes


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_random_specs_have_the_real_models_shapes():
    from engine.models.shapes import (
        build_clip,
        build_text_encoder,
        build_unet,
        build_vae,
        random_base_configs,
        random_encoder_config,
    )

    sd = random_base_configs("random:sd15")
    # Stable Diffusion 1.5's and CLIP ViT-L/14's published parameter counts, built on the meta device.
    assert _count(build_unet(sd["unet"])) == 859_520_964
    assert _count(build_vae(sd["vae"])) == 83_653_863
    assert _count(build_text_encoder(sd["text_encoder"])) == 123_060_480
    assert _count(build_clip(random_encoder_config("random:clip-vit-l14"))) == 427_616_513
    assert sd["unet"]["sample_size"] * 8 == 512


@pytest.mark.parametrize("width", [0.125, 0.3, 0.5])
def test_width_keeps_the_shapes_consistent(width):
    from engine.models.shapes import random_base_configs, random_encoder_config

    sd = random_base_configs(f"random:sd15:width={width}:size=64")
    unet, vae, text = sd["unet"], sd["vae"], sd["text_encoder"]
    assert unet["sample_size"] == 8 and vae["sample_size"] == 64
    assert all(c % unet["norm_num_groups"] == 0 and c % unet["attention_head_dim"] == 0 for c in unet["block_out_channels"])
    assert all(c % vae["norm_num_groups"] == 0 for c in vae["block_out_channels"])
    assert unet["cross_attention_dim"] == text["hidden_size"] and text["hidden_size"] % text["num_attention_heads"] == 0
    assert unet["layers_per_block"] == 2 and text["num_hidden_layers"] == 12  # depth stays
    clip = random_encoder_config(f"random:clip-vit-l14:width={width}")
    for tower in ("text_config", "vision_config"):
        cfg = clip[tower]
        assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0 and cfg["projection_dim"] == clip["projection_dim"]


def test_random_sd15_samples_at_its_native_side_with_the_same_weights_everywhere():
    from engine.models.loading import native_size
    from engine.stages.generate.sampler import PromptEncoder, make_scheduler, sample_images

    spec = "random:sd15:width=0.125:size=64"
    before = torch.random.get_rng_state()
    pipe = load_pipeline(spec, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random state is untouched
    assert native_size(pipe.unet, pipe.vae) == 64 and len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size
    again = load_pipeline(spec, device="cpu")
    other = load_pipeline(spec + ":seed=1", device="cpu")
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(again, part).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not torch.equal(pipe.unet.conv_in.weight, other.unet.conv_in.weight)
    scheduler = make_scheduler("dpm_solver_multistep", pipe.scheduler.config)
    images = sample_images(pipe.unet, pipe.vae, scheduler, PromptEncoder(pipe.tokenizer, pipe.text_encoder, "cpu"),
                           ["a photo of a landbird on land"], [""], [0], 2, 7.5)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8


def test_random_clip_encoder_embeds_images_and_texts():
    enc = load_encoder("random:clip-vit-l14:width=0.125", device="cpu")
    assert isinstance(enc, ClipEncoder) and enc.dim == 96
    img = enc.encode_images(np.stack([render("duck", "ocean", s, "benchmark", 48) for s in range(2)]))
    txt = enc.encode_texts([caption("duck", "ocean"), caption("crow", "desert")])
    assert img.shape == (2, 96) and txt.shape == (2, 96)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    again = load_encoder("random:clip-vit-l14:width=0.125", device="cpu")
    np.testing.assert_allclose(again.encode_texts([caption("duck", "ocean")]), txt[:1], atol=1e-6)


def test_bad_random_specs_fail_in_one_line():
    from engine.config import load_config

    with pytest.raises(FairsynthError, match=r"model.base = 'random:sd14': unknown random model"):
        load_config(None, ["model.base=random:sd14"])
    with pytest.raises(FairsynthError, match=r"model.encoder = .*bad option 'size=64'"):
        load_config(None, ["model.encoder=random:clip-vit-l14:size=64"])
    with pytest.raises(FairsynthError, match=r"bad option 'width=0'"):
        load_config(None, ["model.base=random:sd15:width=0"])
    with pytest.raises(FairsynthError, match=r"bad option 'size=100'"):
        load_pipeline("random:sd15:size=100", device="cpu")
    assert load_config(None, ["model.base=random:sd15:width=0.25:size=128:seed=3"]).model.base.endswith("seed=3")


# --------------------------------------------------------------------------- one resolution


def test_finetuning_and_sampling_use_the_native_side_not_data_image_size():
    """The tiny model draws 32 px images (8x8 latents); data.image_size=48 must change neither
    what fine-tuning trains on, nor the prior-preservation images, nor what the sampler draws."""
    import pandas as pd

    from engine.config import load_config
    from engine.stages.data.builtin import OBJECTS
    from engine.stages.finetune.trainer import UnitJob, UnitTrainer, draw_class_images
    from engine.stages.generate.sampler import SyntheticImageSampler
    from engine.stages.generate.shards import decode_png

    cfg = load_config(None, ["data.image_size=48", "model.device=cpu", "finetune.batch_size=3",
                             "generate.steps=2", "generate.batch_size=2"])
    sources = [f"builtin://{OBJECTS[0]}/ocean/{s}" for s in range(3)]
    job = UnitJob(method="lora", unit="g0", sources=sources, train_prompt="a photo of a landbird on land",
                  class_prompt="a photo of a landbird", class_images=None, model=cfg.model,
                  finetune=cfg.finetune, seed=0)
    trainer = UnitTrainer(job, "cpu")
    trainer._build()
    trainer._prepare_data()
    assert trainer.image_size == 32
    batch = trainer._sample_latents(trainer.latent_mean, trainer.latent_std, torch.Generator().manual_seed(0))
    assert tuple(batch.shape) == (3, 4, 8, 8)  # 32 px through the VAE; 48 px would give 12x12
    class_images = draw_class_images(cfg.model, cfg.generate, "a photo of a landbird", 2, 0, "cpu")
    assert class_images.shape == (2, 32, 32, 3)
    sampler = SyntheticImageSampler(cfg.model_dump(mode="json"), "/nonexistent", "vanilla", "tiny")
    rows = pd.DataFrame({
        "shard": ["part-0"] * 2, "label": [0, 0], "attribute": [0, 0], "group": [0, 0], "unit": ["g0"] * 2,
        "cluster": [-1, -1], "seed": [1, 2], "prompt": ["a photo of a landbird on land"] * 2,
        "negative_prompt": [""] * 2, "artifact_kind": ["base"] * 2, "artifact": [""] * 2, "model_strength": [1.0] * 2,
    })
    drawn = sampler(rows)
    assert [decode_png(png).shape for png in drawn["image"]] == [(32, 32, 3)] * 2
