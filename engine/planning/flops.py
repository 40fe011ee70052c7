"""FLOPs of one sample through each model a stage runs, counted rather than estimated.

Every model is the real class (diffusers ``UNet2DConditionModel`` and ``AutoencoderKL``,
transformers ``CLIPTextModel`` and CLIP vision tower, the engine's classifier backbones, the
tiny CLIP) built from the configured model's config on PyTorch's meta device, so no weights,
memory or GPU are needed; ``torch.utils.flop_counter.FlopCounterMode`` counts the matrix
products and convolutions of one forward pass (and of the backward pass, gradient
checkpointing's recomputation included, for training). Element-wise work, normalisation and
softmax are not counted: next to the matrix work of these models they are a few per cent.

Configs come from, in order: the shipped tiny model, a local diffusers / transformers folder,
the local Hugging Face cache, and for a hub id that is not cached the Stable Diffusion 1.5
and CLIP ViT-L/14 configs kept in ``engine/models/sd15/`` (the shapes real runs use).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from engine.config import ModelConfig
from engine.models.shapes import (  # noqa: F401 - the builders are part of this module's API
    SD15_DIR,
    build_text_encoder,
    build_unet,
    build_vae,
    is_random_spec,
    random_base_configs,
    random_encoder_config,
)

log = logging.getLogger(__name__)

SD15_FILES = {"unet": "unet.json", "vae": "vae.json", "text_encoder": "text_encoder.json"}
CLIP_FILE = "clip_vit_l14.json"


@dataclass(frozen=True)
class DiffusionShapes:
    """The configs of a Stable Diffusion checkpoint's three networks (JSON text, hashable)."""

    unet: str
    vae: str
    text_encoder: str
    source: str

    def config(self, part: str) -> dict:
        return json.loads(getattr(self, part))

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell: 2 ** (number of VAE blocks - 1)."""
        return 2 ** (len(self.config("vae")["block_out_channels"]) - 1)

    @property
    def native_size(self) -> int:
        """Image side the generate stage samples at (the UNet's sample size in pixels)."""
        return int(self.config("unet")["sample_size"]) * self.vae_scale

    @property
    def text_length(self) -> int:
        return int(self.config("text_encoder").get("max_position_embeddings", 77))


@dataclass(frozen=True)
class EncoderShapes:
    """The image/text encoder of the cluster and filter stages."""

    kind: str  # "tiny_clip" or "clip"
    config: str  # JSON text
    source: str

    @property
    def image_size(self) -> int:
        cfg = json.loads(self.config)
        return int(cfg["image_size"] if self.kind == "tiny_clip" else cfg["vision_config"]["image_size"])

    @property
    def dim(self) -> int:
        cfg = json.loads(self.config)
        return int(cfg["embed_dim"] if self.kind == "tiny_clip" else cfg.get("projection_dim", 512))


def _dumps(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True)


def _read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _hub_cached(repo_id: str, filename: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # an id the hub client rejects is simply not cached
        return None
    return Path(found) if isinstance(found, str) else None


def diffusion_shapes(model: ModelConfig) -> DiffusionShapes:
    """The configs of ``model.base``: shipped tiny, local folder, hub cache, or SD 1.5's."""
    if model.base == "tiny":
        from engine.models import tiny

        folder = tiny.tiny_model_path()
        parts = {}
        for part, builder in (("unet", tiny.unet_config), ("vae", tiny.vae_config), ("text_encoder", tiny.text_encoder_config)):
            shipped = folder / part / "config.json"
            parts[part] = _read(shipped) if shipped.is_file() else builder()
        return DiffusionShapes(**{k: _dumps(v) for k, v in parts.items()}, source="tiny (shipped)")
    if is_random_spec(model.base):
        configs = random_base_configs(model.base)
        return DiffusionShapes(**{p: _dumps(configs[p]) for p in SD15_FILES}, source=f"{model.base} (engine/models/sd15)")
    folder = Path(model.base).expanduser()
    if folder.is_dir() and all((folder / p / "config.json").is_file() for p in SD15_FILES):
        return DiffusionShapes(**{p: _dumps(_read(folder / p / "config.json")) for p in SD15_FILES}, source=str(folder))
    cached = {p: _hub_cached(model.base, f"{p}/config.json") for p in SD15_FILES}
    if all(cached.values()):
        return DiffusionShapes(**{p: _dumps(_read(c)) for p, c in cached.items()}, source=f"{model.base} (hub cache)")
    return DiffusionShapes(
        **{p: _dumps(_read(SD15_DIR / f)) for p, f in SD15_FILES.items()},
        source=f"engine/models/sd15 (Stable Diffusion 1.5 shapes; {model.base} is not readable here)",
    )


def encoder_shapes(model: ModelConfig) -> EncoderShapes:
    """The configs of ``model.encoder``: shipped tiny CLIP, local folder, hub cache, or ViT-L/14's."""
    from engine.models.encoders import TINY_CLIP_CONFIG, TinyClipModel
    from engine.models.tiny import tiny_clip_path

    spec = model.encoder
    if is_random_spec(spec):
        return EncoderShapes("clip", _dumps(random_encoder_config(spec)), f"{spec} (engine/models/sd15/{CLIP_FILE})")
    folder = tiny_clip_path() if spec == "tiny" else Path(spec).expanduser()
    config_file = folder / TINY_CLIP_CONFIG
    if config_file.is_file() and _read(config_file).get("architecture") == "tiny_clip":
        return EncoderShapes("tiny_clip", _dumps(_read(config_file)), f"{spec} ({folder})")
    if spec == "tiny":
        # Before the tiny CLIP is trained its folder is empty; the architecture is the default one.
        return EncoderShapes("tiny_clip", _dumps(TinyClipModel().config), "tiny (default architecture)")
    if config_file.is_file():
        return EncoderShapes("clip", _dumps(_read(config_file)), str(folder))
    cached = _hub_cached(spec, "config.json")
    if cached is not None:
        return EncoderShapes("clip", _dumps(_read(cached)), f"{spec} (hub cache)")
    return EncoderShapes(
        "clip", _dumps(_read(SD15_DIR / CLIP_FILE)),
        f"engine/models/sd15/{CLIP_FILE} (CLIP ViT-L/14 shapes; {spec} is not readable here)",
    )


# --- counting ------------------------------------------------------------------------------


def count_flops(fn) -> int:
    """FLOPs PyTorch's counter sees while ``fn()`` runs (forward, and backward if it calls it)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _on(device: str = "meta") -> torch.device:
    return torch.device(device)


def _empty(*shape):
    return torch.empty(*shape, device="meta")


@cache
def unet_forward(shapes: DiffusionShapes, latent: int) -> int:
    """One denoising step of one image (no guidance) at ``latent`` x ``latent`` cells."""
    unet = build_unet(shapes.unet)
    cfg = shapes.config("unet")
    context = _empty(1, shapes.text_length, cfg["cross_attention_dim"])
    x = _empty(1, cfg["in_channels"], latent, latent)
    t = torch.ones(1, device="meta")
    with torch.no_grad():
        return count_flops(lambda: unet(x, t, encoder_hidden_states=context).sample)


@cache
def unet_train_step(shapes: DiffusionShapes, latent: int, lora_rank: int | None, checkpointing: bool) -> int:
    """Forward + backward of one image through the UNet as fine-tuning runs it: every weight
    trainable, or (``lora_rank``) only LoRA adapters on the attention projections, in which
    case the backward pass computes activation gradients but no frozen-weight gradients."""
    from engine.generation_methods import UNET_LORA_TARGETS

    unet = build_unet(shapes.unet)
    unet.train()
    if lora_rank:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=UNET_LORA_TARGETS))
    if checkpointing:
        unet.enable_gradient_checkpointing()
    cfg = shapes.config("unet")
    context = _empty(1, shapes.text_length, cfg["cross_attention_dim"])
    x = _empty(1, cfg["in_channels"], latent, latent)
    t = torch.ones(1, device="meta")
    return count_flops(lambda: unet(x, t, encoder_hidden_states=context).sample.sum().backward())


@cache
def vae_encode(shapes: DiffusionShapes, pixels: int) -> int:
    vae = build_vae(shapes.vae)
    x = _empty(1, vae.config.in_channels, pixels, pixels)
    with torch.no_grad():
        return count_flops(lambda: vae.encode(x).latent_dist.mean)


@cache
def vae_decode(shapes: DiffusionShapes, latent: int) -> int:
    vae = build_vae(shapes.vae)
    z = _empty(1, vae.config.latent_channels, latent, latent)
    with torch.no_grad():
        return count_flops(lambda: vae.decode(z).sample)


@cache
def text_encoder_forward(shapes: DiffusionShapes, train: bool = False) -> int:
    """One prompt through the text encoder (forward, or forward + backward)."""
    encoder = build_text_encoder(shapes.text_encoder)
    ids = torch.zeros(1, shapes.text_length, dtype=torch.long, device="meta")
    if train:
        encoder.train()
        return count_flops(lambda: encoder(ids)[0].sum().backward())
    with torch.no_grad():
        return count_flops(lambda: encoder(ids)[0])


class ImageTower(nn.Module):
    """An encoder's image path as a module: pixels -> embeddings, whatever the encoder's API."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if hasattr(self.model, "encode_image"):
            return self.model.encode_image(pixels)
        return self.model(pixel_values=pixels).image_embeds


def build_image_tower(shapes: EncoderShapes, device: str = "meta") -> ImageTower:
    """The cluster/filter encoder's image tower (tiny CLIP's CNN, or a CLIP vision model)."""
    cfg = json.loads(shapes.config)
    if shapes.kind == "tiny_clip":
        from engine.models.encoders import TinyClipModel

        keys = ("embed_dim", "width", "token_dim", "image_size", "vocab_size")
        with _on(device):
            return ImageTower(TinyClipModel(**{k: cfg[k] for k in keys if k in cfg}))
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    vision = dict(cfg["vision_config"])
    vision.setdefault("projection_dim", cfg.get("projection_dim", 512))
    with _on(device):
        return ImageTower(CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(vision)))


@cache
def image_encoder_forward(shapes: EncoderShapes) -> int:
    """One image through the cluster/filter encoder's image tower, at its own input size."""
    tower = build_image_tower(shapes)
    x = _empty(1, 3, shapes.image_size, shapes.image_size)
    with torch.no_grad():
        return count_flops(lambda: tower(x))


@cache
def classifier_step(backbone: str, n_classes: int, size: int, mode: str) -> int:
    """One image through the train stage's classifier: ``mode`` is "eval" (forward),
    "train" (forward + backward, every weight) or "head" (encoder frozen: the last-layer
    fine-tuning of a generative method's second stage)."""
    from engine.stages.train.backbones import build_classifier

    with _on():
        model = build_classifier(backbone, n_classes)
    x = _empty(1, 3, size, size)
    if mode == "eval":
        model.eval()
        with torch.no_grad():
            return count_flops(lambda: model(x)[0])
    model.train()
    if mode == "head":
        model.encoder.requires_grad_(False)
        model.encoder.eval()

    def step():
        logits, features = model(x)
        (logits.sum() + features.sum()).backward()

    return count_flops(step)
