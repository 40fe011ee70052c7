"""Loading Stable Diffusion pipelines: the shipped tiny model, a local folder or a hub id.

Policy, the same for every caller: diffusers format, safetensors weights only (pickled
``.bin``/``.ckpt``/``.pt`` weights only with ``allow_pickle=True``), never remote code, hub ids
resolved offline first, fp16 on CUDA and fp32 on CPU, PyTorch SDPA attention unless xformers
is asked for. Every bad input raises :class:`FairsynthError` with a one-line explanation.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path

import torch

from engine.errors import FairsynthError
from engine.models.shapes import is_random_spec, random_pipeline
from engine.models.tiny import tiny_model_path

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("sdpa", "xformers")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", ".\\")) or "\\" in spec or spec in (".", "..")


def _in_hub_cache(repo_id: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of diffusers and transformers
        return False
    found = try_to_load_from_cache(repo_id, filename)
    return isinstance(found, str)


def resolve_pretrained(spec: str, what: str, marker: str = "config.json") -> tuple[str, bool]:
    """A local folder or a hub id -> (what to pass to ``from_pretrained``, local_files_only).

    A hub id already in the local cache is used from it without contacting the hub; one not in
    the cache is downloaded unless the hub is offline.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise FairsynthError(f"{what} {spec!r} is empty; expected a local folder or a hub id")
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FairsynthError(f"{what} path {path} is a file; expected a folder in "
                                 f"from_pretrained format (with {marker})")
        return str(path), True
    if _looks_like_path(spec) or not _HUB_ID.match(spec):
        raise FairsynthError(f"{what} path {spec} does not exist; expected a local folder or a "
                             "hub id such as 'org/name'")
    if _in_hub_cache(spec, marker):
        return spec, True
    if hub_offline():
        raise FairsynthError(f"{what} {spec!r} is not in the local Hugging Face cache and the hub "
                             "is offline (HF_HUB_OFFLINE=1); expected a cached hub id or a local folder")
    return spec, False


def _check_local_sd_folder(path: Path, allow_pickle: bool) -> None:
    if not (path / "model_index.json").is_file():
        raise FairsynthError(f"Stable Diffusion folder {path} has no model_index.json; expected a "
                             "diffusers-format pipeline folder (StableDiffusionPipeline.save_pretrained)")
    weight_dirs: dict[Path, set[str]] = {}
    for f in path.rglob("*"):
        if f.is_file() and (f.suffix in PICKLE_SUFFIXES or f.suffix == ".safetensors"):
            weight_dirs.setdefault(f.parent, set()).add(f.suffix)
    if not weight_dirs:
        raise FairsynthError(f"Stable Diffusion folder {path} holds no weight files; expected "
                             "*.safetensors in its unet/, vae/ and text_encoder/ folders")
    pickle_only = sorted(str(d.relative_to(path)) or "." for d, suffixes in weight_dirs.items()
                         if ".safetensors" not in suffixes)
    if pickle_only and not allow_pickle:
        raise FairsynthError(
            f"Stable Diffusion folder {path} has pickle-only weights in {', '.join(pickle_only)}; "
            "expected safetensors (convert them, or pass allow_pickle=True if you trust the files)"
        )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_base_pipeline(base: str, device: str, attention: str = "sdpa", allow_pickle: bool = False,
                       dtype: torch.dtype | None = None):
    """The base pipeline with its progress bars off: fp16 on CUDA and fp32 on CPU for
    sampling, or ``dtype`` (fine-tuning keeps fp32 weights and autocasts)."""
    if str(device).startswith("cuda"):
        # Ampere+ runs any fp32 leftovers (schedulers, casts) on tensor cores.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    pipe = load_pipeline(base, device, dtype=dtype, attention=attention, allow_pickle=allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_pretrained(base: str, dtype: torch.dtype, allow_pickle: bool):
    """(where it came from, the pipeline on the CPU) for the shipped tiny model, a folder or a hub id."""
    from diffusers import StableDiffusionPipeline

    if base == "tiny":
        path = tiny_model_path()
        if not (path / "model_index.json").is_file():
            raise FairsynthError(f"the shipped tiny model is missing from {path}; expected it "
                                 "there (rebuild it with `python jobs/pretrain_tiny.py`)")
        source, local_only = str(path), True
    else:
        source, local_only = resolve_pretrained(base, "Stable Diffusion model", "model_index.json")
    if local_only and Path(source).is_dir():
        _check_local_sd_folder(Path(source), allow_pickle)
    _quiet_loading_bars()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            dtype=dtype,
            # None: prefer safetensors and fall back to pickle; True: safetensors or fail.
            use_safetensors=None if allow_pickle else True,
            local_files_only=local_only,
            safety_checker=None,
            requires_safety_checker=False,
            trust_remote_code=False,
        )
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise FairsynthError(f"cannot load Stable Diffusion model {base!r} from {source}: "
                             f"{_one_line(exc)}; expected a diffusers StableDiffusionPipeline "
                             "with safetensors weights") from exc
    return source, pipe


def _cast(pipe, dtype: torch.dtype):
    """``pipe`` in ``dtype``, without diffusers' warning that casting with ``to()`` skips the
    modules a checkpoint keeps in fp32 (a model built from its config keeps none)."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return pipe.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _quiet_loading_bars() -> None:
    """No per-component loading bars: every sampler actor and trial loads a pipeline, and
    their bars would bury the stage's own progress bar."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_pipeline(base: str, device: str | None = None, dtype: torch.dtype | None = None,
                  attention: str = "sdpa", allow_pickle: bool = False):
    """A diffusers ``StableDiffusionPipeline`` (no safety checker) on ``device``.

    ``base``: ``"tiny"`` (the shipped model), ``"random:sd15[:width=<w>]"`` (Stable Diffusion
    1.5's shapes with seeded random weights, ``engine.models.shapes``), a local diffusers
    folder, or a hub id.
    """
    if attention not in ATTENTION_BACKENDS:
        raise FairsynthError(f"attention backend {attention!r} is unknown; expected one of "
                             f"{', '.join(ATTENTION_BACKENDS)}")
    if attention == "xformers" and importlib.util.find_spec("xformers") is None:
        raise FairsynthError("attention='xformers' but xformers is not installed; expected "
                             "`pip install xformers` (a CUDA build) or attention='sdpa'")
    device = str(device or default_device())
    dtype = dtype or default_dtype(device)
    if is_random_spec(base):
        source, pipe = "engine/models/sd15 (seeded random weights)", _cast(random_pipeline(base), dtype)
    else:
        source, pipe = _from_pretrained(base, dtype, allow_pickle)
    try:
        pipe = pipe.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise FairsynthError(f"cannot move the pipeline to device {device!r}: {_one_line(exc)}; "
                             "expected 'cpu' or an available 'cuda[:N]'") from exc
    if attention == "xformers":
        try:
            pipe.enable_xformers_memory_efficient_attention()
        except (ValueError, RuntimeError, ModuleNotFoundError) as exc:
            raise FairsynthError(f"cannot enable xformers attention on {device}: {_one_line(exc)}; "
                                 "expected a CUDA device and a matching xformers build, or "
                                 "attention='sdpa'") from exc
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        for model in (pipe.unet, pipe.vae):
            if getattr(model, "attn_processors", None):
                model.set_attn_processor(AttnProcessor2_0())
    logger.info("loaded %s from %s on %s (%s, %s attention)", base, source, device, dtype, attention)
    return pipe


def native_size(unet, vae) -> int:
    """The image side a Stable Diffusion model draws and trains at: the UNet's latent sample
    size times the VAE's downsampling (512 px for SD 1.5, 32 px for the tiny model)."""
    return int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
