"""Paper-scale model shapes without weights: Stable Diffusion 1.5 and CLIP ViT-L/14 built from
the configs kept in ``engine/models/sd15/``, on the meta device (to count FLOPs and parameters) or
with seeded random weights (to run every stage at full cost where no weights can be fetched).

A random model is named by a spec ``random:<name>[:width=<w>][:size=<px>][:seed=<n>]``:

- ``random:sd15``: a ``StableDiffusionPipeline`` (UNet2DConditionModel, AutoencoderKL,
  CLIPTextModel, the offline CLIP BPE tokenizer, the PNDM schedule of SD 1.5), for
  ``model.base``.
- ``random:clip-vit-l14``: a transformers ``CLIPModel`` with CLIP's image preprocessing and the
  same tokenizer, for ``model.encoder``.
- ``width`` (default 1) scales every channel width and hidden size (see :func:`scale_width`);
  depths, head counts, vocabulary and text length stay (``width=0.125``: 1/64 of the
  parameters).
- ``size`` (``random:sd15`` only; default 512) is the native image side the model draws and
  fine-tunes at. On two CPU cores ``random:sd15:width=0.125`` still takes about 17 s per
  UNet call on a batch of two 512 px images (most of it self-attention over 4096 latent
  cells); at ``size=64`` the paper presets' code path runs end to end in minutes.
- ``seed`` (default 0): weights are drawn on the CPU from this seed whatever the device, so
  every process (a trial, a sampler actor, a class-image task) builds the same model.

Width and size belong to the spec rather than config keys of their own so that everything that
already records ``model.base`` / ``model.encoder`` (stage hashes, the fine-tune fingerprint,
the manifest's and shards' ``base_model``) tells a narrow model from a full one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from engine.errors import FairsynthError

SD15_DIR = Path(__file__).resolve().parent / "sd15"
SD15_FILES = {"unet": "unet.json", "vae": "vae.json", "text_encoder": "text_encoder.json"}
SCHEDULER_FILE = "scheduler.json"
CLIP_FILE = "clip_vit_l14.json"
RANDOM_PREFIX = "random:"
RANDOM_BASES = ("sd15",)
RANDOM_ENCODERS = ("clip-vit-l14",)
# The side of a random Stable Diffusion: its VAE halves it 3 times and its UNet 3 more.
SIZE_MULTIPLE = 64


# --- specs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomSpec:
    """A parsed ``random:<name>[:width=<w>][:size=<px>][:seed=<n>]``."""

    name: str
    width: float = 1.0
    size: int | None = None  # native image side; None: the model's own (512 px for SD 1.5)
    seed: int = 0


def is_random_spec(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(RANDOM_PREFIX)


def _option(name: str, field: str, raw: str):
    """One ``field=raw`` option's value; ValueError when malformed or not for ``name``."""
    if field == "width":
        value = float(raw)
        if not (math.isfinite(value) and 0 < value <= 4):
            raise ValueError
        return value
    if field == "size" and name in RANDOM_BASES:
        value = int(raw)
        if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
            raise ValueError
        return value
    if field == "seed":
        return int(raw)
    raise ValueError


def random_spec(spec: str, known: tuple[str, ...]) -> RandomSpec:
    """``spec`` -> :class:`RandomSpec`; ValueError (what is wrong, and the form) if malformed."""
    name, *options = spec[len(RANDOM_PREFIX):].split(":")
    size = "[:size=<px>]" if known == RANDOM_BASES else ""
    usage = (f"expected random:<{'|'.join(known)}>[:width=<w>]{size}[:seed=<n>], "
             f"e.g. random:{known[0]}:width=0.125")
    if name not in known:
        raise ValueError(f"unknown random model {name!r}; {usage}")
    values: dict = {}
    for option in options:
        field, _, raw = option.partition("=")
        try:
            values[field] = _option(name, field, raw)
        except ValueError:
            raise ValueError(f"bad option {option!r} (width: a number in (0, 4]"
                             + (f", size: a multiple of {SIZE_MULTIPLE} pixels" if size else "")
                             + f", seed: an integer); {usage}") from None
    return RandomSpec(name, **values)


def parse_random_spec(spec: str, known: tuple[str, ...], key: str) -> RandomSpec:
    """:func:`random_spec` for a loader: a malformed spec is a one-line error naming ``key``."""
    try:
        return random_spec(spec, known)
    except ValueError as exc:
        raise FairsynthError(f"{key} = {spec!r}: {exc}") from None


# --- configs ---------------------------------------------------------------------------------


def _read(name: str) -> dict:
    return json.loads((SD15_DIR / name).read_text())


def scale_width(value: int, width: float, multiple: int = 1) -> int:
    """``value * width`` rounded to a multiple of ``multiple`` (at least one multiple)."""
    return max(multiple, int(round(value * width / multiple)) * multiple)


def _scaled_groups(groups: int, width: float) -> int:
    """GroupNorm groups at ``width``: fewer groups for narrower layers, so that each keeps
    about as many channels per group as the full model (32 groups at width 1, 4 at 0.125)."""
    return max(1, min(groups, int(round(groups * width))))


def _scale_text(config: dict, width: float) -> dict:
    """A CLIP text (or vision) transformer: hidden size a multiple of its head count."""
    out = dict(config)
    heads = int(config["num_attention_heads"])
    out["hidden_size"] = scale_width(config["hidden_size"], width, heads)
    out["intermediate_size"] = scale_width(config["intermediate_size"], width, heads)
    if "projection_dim" in config:
        out["projection_dim"] = scale_width(config["projection_dim"], width, 8)
    return out


def sd15_configs(width: float = 1.0, size: int | None = None) -> dict[str, dict]:
    """Stable Diffusion 1.5's unet / vae / text_encoder / scheduler configs at ``width``, drawing
    ``size`` px images (None: its own 512).

    UNet and VAE channels stay multiples of their GroupNorm groups (scaled too) and the UNet's
    channels multiples of its attention heads (kept: SD 1.5's ``attention_head_dim`` of 8 is a
    head count); the UNet's cross-attention width follows the text encoder's hidden size.
    """
    configs = {part: _read(name) for part, name in SD15_FILES.items()}
    configs["scheduler"] = _read(SCHEDULER_FILE)
    if size is not None:
        scale = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
        configs["unet"]["sample_size"], configs["vae"]["sample_size"] = size // scale, size
    if width == 1.0:
        return configs
    text = _scale_text(configs["text_encoder"], width)
    unet, vae = dict(configs["unet"]), dict(configs["vae"])
    for net in (unet, vae):
        net["norm_num_groups"] = _scaled_groups(net["norm_num_groups"], width)
    heads = unet.get("num_attention_heads") or unet["attention_head_dim"]
    heads = max(heads) if isinstance(heads, list) else heads
    multiple = math.lcm(unet["norm_num_groups"], int(heads))
    unet["block_out_channels"] = [scale_width(c, width, multiple) for c in unet["block_out_channels"]]
    unet["cross_attention_dim"] = text["hidden_size"]
    vae["block_out_channels"] = [scale_width(c, width, vae["norm_num_groups"]) for c in vae["block_out_channels"]]
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": configs["scheduler"]}


def clip_vit_l14_config(width: float = 1.0) -> dict:
    """CLIP ViT-L/14's config at ``width`` (one projection size shared by both towers)."""
    config = _read(CLIP_FILE)
    if width == 1.0:
        return config
    out = dict(config)
    out["text_config"] = _scale_text(config["text_config"], width)
    out["vision_config"] = _scale_text(config["vision_config"], width)
    out["projection_dim"] = scale_width(config["projection_dim"], width, 8)
    for tower in ("text_config", "vision_config"):
        out[tower]["projection_dim"] = out["projection_dim"]
    return out


def random_base_configs(spec: str) -> dict[str, dict]:
    """The unet / vae / text_encoder / scheduler configs a ``random:sd15...`` spec builds."""
    parsed = parse_random_spec(spec, RANDOM_BASES, "model.base")
    return sd15_configs(parsed.width, parsed.size)


def random_encoder_config(spec: str) -> dict:
    """The CLIPModel config a ``random:clip-vit-l14...`` spec builds."""
    return clip_vit_l14_config(parse_random_spec(spec, RANDOM_ENCODERS, "model.encoder").width)


# --- builders (meta device, or real tensors) -------------------------------------------------


def _config(config: dict | str) -> dict:
    return json.loads(config) if isinstance(config, str) else dict(config)


def build_unet(config: dict | str, device: str = "meta"):
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel.from_config(_config(config))


def build_vae(config: dict | str, device: str = "meta"):
    import torch
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL.from_config(_config(config))


def build_text_encoder(config: dict | str, device: str = "meta"):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        return CLIPTextModel(CLIPTextConfig.from_dict(_config(config)))


def build_clip(config: dict | str, device: str = "meta"):
    import torch
    from transformers import CLIPConfig, CLIPModel

    with torch.device(device):
        return CLIPModel(CLIPConfig.from_dict(_config(config)))


class _seeded:
    """Draw initial weights from ``seed`` on the CPU, leaving the caller's random state alone."""

    def __init__(self, seed: int):
        import torch

        self.seed = seed
        self._fork = torch.random.fork_rng(devices=[])

    def __enter__(self):
        import torch

        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


# --- random models ---------------------------------------------------------------------------


def random_pipeline(spec: str):
    """A ``StableDiffusionPipeline`` of ``spec``'s shapes with seeded random fp32 weights on the CPU."""
    from diffusers import PNDMScheduler

    from engine.models.tiny import assemble_pipeline
    from engine.models.tokenizer import build_clip_tokenizer

    seed = parse_random_spec(spec, RANDOM_BASES, "model.base").seed
    configs = random_base_configs(spec)
    tokenizer = build_clip_tokenizer()
    if configs["text_encoder"]["vocab_size"] != len(tokenizer):
        raise FairsynthError(f"engine/models/sd15/text_encoder.json has vocab_size {configs['text_encoder']['vocab_size']} "
                             f"but the CLIP tokenizer has {len(tokenizer)} tokens; make them equal")
    with _seeded(seed):
        unet = build_unet(configs["unet"], "cpu")
        vae = build_vae(configs["vae"], "cpu")
        text_encoder = build_text_encoder(configs["text_encoder"], "cpu")
    scheduler = PNDMScheduler.from_config(configs["scheduler"])
    return assemble_pipeline(vae.eval(), unet.eval(), text_encoder.eval(), tokenizer, scheduler)


def random_clip(spec: str):
    """(``CLIPModel``, ``CLIPProcessor``) of ``spec``'s shapes with seeded random fp32 weights."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from engine.models.tokenizer import build_clip_tokenizer

    seed = parse_random_spec(spec, RANDOM_ENCODERS, "model.encoder").seed
    config = random_encoder_config(spec)
    with _seeded(seed):
        model = build_clip(config, "cpu")
    side = int(config["vision_config"]["image_size"])
    # CLIPImageProcessor's defaults are OpenAI CLIP's resize, crop and normalisation.
    images = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return model.eval(), CLIPProcessor(image_processor=images, tokenizer=build_clip_tokenizer())
