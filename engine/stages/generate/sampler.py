"""Batched Stable Diffusion sampling on a pipeline's parts, and the Ray Data actor that runs it.

:func:`sample_images` is the sampling core the generate stage and the throughput benchmark
share: prompts are encoded once and cached, the unconditional and conditional halves go
through the UNet in one call (classifier-free guidance), the scheduler comes from config, and
the VAE decodes straight to uint8. The initial noise of each image comes from its own seeded
CPU generator, so an image is the same whatever batch it lands in, on any device, and equals
what a plain ``StableDiffusionPipeline`` call with ``generator=torch.Generator().manual_seed(seed)``
draws.

:class:`SyntheticImageSampler` is the Ray Data actor: it loads the base pipeline once and
switches units cheaply (LoRA adapters loaded once and swapped by name, DreamBooth UNets kept in
a small LRU cache), and returns PNG bytes, never float arrays, so the object store stays small.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd

from engine import storage
from engine.errors import FairsynthError
from engine.generation_methods import ARTIFACTS, BASE, get_artifact
from engine.models.loading import load_base_pipeline
from engine.stages.generate.shards import encode_png

log = logging.getLogger(__name__)

# Scheduler name in config -> diffusers class; each is built from the base model's own
# scheduler config, so the noise schedule always matches the checkpoint.
SCHEDULERS = {
    "dpm_solver_multistep": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}
# VAE decodes in chunks: at 512 px the decoder's activations dominate memory, not the UNet's.
DECODE_CHUNK = 16


def make_scheduler(name: str, base_scheduler_config):
    import diffusers

    if name not in SCHEDULERS:
        raise FairsynthError(f"generate.scheduler = {name!r} is unknown; valid: {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(base_scheduler_config)


class PromptEncoder:
    """Text-encoder hidden states per prompt, computed once and cached (prompts repeat a lot)."""

    def __init__(self, tokenizer, text_encoder, device, max_cached: int = 4096):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.max_cached = max_cached
        self._cache: OrderedDict[str, object] = OrderedDict()

    def _encode(self, prompts: list[str]):
        import torch

        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()
        with torch.inference_mode():
            return self.text_encoder(ids, attention_mask=mask)[0]

    def __call__(self, prompts: list[str]):
        import torch

        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if todo:
            for prompt, hidden in zip(todo, self._encode(todo), strict=True):
                self._cache[prompt] = hidden
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        for p in prompts:
            self._cache.move_to_end(p)
        return torch.stack([self._cache[p] for p in prompts])


def initial_latents(seeds, shape: tuple[int, int, int], device, dtype):
    """One seeded CPU generator per image: the noise does not depend on batch or device.

    Drawn in the sampling dtype on the CPU, as diffusers' ``randn_tensor`` draws it for a
    pipeline call with a CPU generator, so both start from the same bits.
    """
    import torch

    noise = [
        torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(s)), dtype=dtype)
        for s in seeds
    ]
    return torch.cat(noise).to(device=device)


def sample_images(
    unet,
    vae,
    scheduler,
    encode_prompts: PromptEncoder,
    prompts: list[str],
    negative_prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    height: int | None = None,
    width: int | None = None,
    callback=None,
) -> np.ndarray:
    """Draw one image per (prompt, negative prompt, seed): uint8 ``[n, H, W, 3]``.

    ``callback(step, latents)``, when given, runs after every scheduler step (used to count
    FLOPs and to time steps in the benchmark).
    """
    import torch

    device, dtype = unet.device, unet.dtype
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    height = height or unet.config.sample_size * scale
    width = width or unet.config.sample_size * scale
    shape = (unet.config.in_channels, height // scale, width // scale)
    guided = guidance_scale > 1.0 and unet.config.time_cond_proj_dim is None

    with torch.inference_mode():
        cond = encode_prompts(list(prompts)).to(dtype)
        if guided:
            uncond = encode_prompts(list(negative_prompts)).to(dtype)
            context = torch.cat([uncond, cond])
        else:
            context = cond
        scheduler.set_timesteps(steps, device=device)
        latents = initial_latents(seeds, shape, device, dtype) * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            model_in = torch.cat([latents, latents]) if guided else latents
            model_in = scheduler.scale_model_input(model_in, t)
            noise = unet(model_in, t, encoder_hidden_states=context, return_dict=False)[0]
            if guided:
                noise_uncond, noise_cond = noise.chunk(2)
                noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
            if callback is not None:
                callback(i, latents)
        pixels = []
        latents = latents.to(vae.dtype) / vae.config.scaling_factor
        for chunk in latents.split(DECODE_CHUNK):
            image = vae.decode(chunk, return_dict=False)[0]
            # The rounding diffusers' image processor applies, so both produce the same bytes.
            image = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            pixels.append(image.permute(0, 2, 3, 1).cpu())
        return torch.cat(pixels).numpy()


class UnitModels:
    """The UNet and prompt encoder of each unit, switched cheaply on one loaded base pipeline.

    Each artifact kind loads itself (``engine/generation_methods.py``, beside the code that
    saves it) on the shared state kept here: LoRA adapters loaded once on the base UNet and
    swapped by name (the least recently used deleted past ``max_adapters``), and UNets of
    their own in an LRU cache of ``max_unets``, so units sharing a model at one strength are
    not rebuilt.

    ``strength`` scales a unit's change from the base: the base weights plus ``strength`` times
    the fine-tuned ones' difference (a LoRA adapter's weight, the stored changes scaled, or the
    two UNets blended). Borrowed minority units draw at ``generate.borrowed_strength``.
    """

    def __init__(self, pipe, run_root: str | Path, attention: str, allow_pickle: bool,
                 max_unets: int = 2, max_adapters: int = 16):
        self.pipe = pipe
        self.run_root = storage.as_path(run_root)  # a URI, or a path every node mounts
        self.attention = attention
        self.allow_pickle = allow_pickle
        self.max_unets = max_unets
        self.max_adapters = max_adapters
        self.base_unet = pipe.unet
        self.base_prompts = PromptEncoder(pipe.tokenizer, pipe.text_encoder, pipe.device)
        self._unets: OrderedDict[str, tuple] = OrderedDict()
        # LoRA adapters loaded on the base pipeline, by name: their prompt caches per strength.
        self.adapters: OrderedDict[str, dict[float, PromptEncoder]] = OrderedDict()
        self.switches = 0
        self._active: str | None = None

    def local_path(self, artifact: str) -> Path:
        path = self.run_root / artifact
        if not path.exists():
            raise FairsynthError(
                f"fine-tuned model {path} listed in the finetune manifest is missing; re-run the finetune stage"
            )
        # Diffusers loads from local files: an artifact on object storage is fetched once
        # into this node's cache (a local or shared-mount path is used where it is).
        return storage.local_copy(path)

    def activate(self, artifact: str, kind: str, strength: float = 1.0) -> tuple[object, PromptEncoder]:
        """(UNet, prompt encoder) of a unit's artifact, at ``strength`` of its fine-tuning."""
        strength = float(strength)
        if not 0.0 <= strength <= 1.0:  # also refuses NaN
            raise FairsynthError(
                f"model strength {strength} for {artifact or 'the base model'} is outside [0, 1]; "
                "set generate.borrowed_strength between 0 (the base model) and 1 (the lender as trained)"
            )
        if kind not in ARTIFACTS:
            raise FairsynthError(
                f"finetune manifest artifact_kind {kind!r} for {artifact} is unknown; "
                f"valid: {', '.join(ARTIFACTS)}"
            )
        if strength == 0.0 or kind == BASE or not artifact:
            kind, artifact, strength = BASE, "", 1.0  # none of the fine-tuning: the base model itself
        key = f"{kind}:{artifact}:{strength}"
        if key != self._active:
            self.switches += 1
            self._active = key
        return get_artifact(kind).activate(self, artifact, strength)

    def text_adapters(self) -> set[str]:
        return set(getattr(self.pipe.text_encoder, "peft_config", None) or {})

    def disable_adapters(self) -> None:
        from diffusers.loaders.lora_base import disable_lora_for_text_encoder

        if self.adapters:
            self.base_unet.disable_lora()
            if self.text_adapters():
                disable_lora_for_text_encoder(self.pipe.text_encoder)

    def cached_unet(self, artifact: str, strength: float, build) -> tuple[object, PromptEncoder]:
        """``build(self, local path, strength)`` once per artifact and strength; the last
        ``max_unets`` stay loaded."""
        key = f"{artifact}:{strength}"
        if key not in self._unets:
            self._unets[key] = build(self, self.local_path(artifact), strength)
            while len(self._unets) > self.max_unets:
                self._unets.popitem(last=False)
        self._unets.move_to_end(key)
        return self._unets[key]


class SyntheticImageSampler:
    """Ray Data actor: plan rows in, PNG rows out (the synthetic Parquet schema plus ``shard`` and
    the timing columns in ``engine.stages.generate.shards.TIMING_COLUMNS``, which the shard writer consumes)."""

    def __init__(self, config: dict, run_root: str, method: str, base_model: str):
        import torch

        from engine.config import Config
        from engine.raylib import device_for

        cfg = Config.model_validate(config)
        self.gen = cfg.generate
        self.method = method
        self.base_model = base_model
        self.device = device_for(self.gen.actor_num_gpus, cfg.model.device)
        started = time.perf_counter()
        pipe = load_base_pipeline(cfg.model.base, self.device, cfg.model.attention, cfg.model.allow_pickle)
        self.scheduler = make_scheduler(self.gen.scheduler, pipe.scheduler.config)
        self.vae = pipe.vae
        self.models = UnitModels(
            pipe, run_root, cfg.model.attention, cfg.model.allow_pickle, max_unets=self.gen.unet_cache_size
        )
        log.info(
            "sampler on %s (%d threads) loaded %s in %.1fs",
            self.device, torch.get_num_threads(), cfg.model.base, time.perf_counter() - started,
        )

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        started = time.time()
        batch = batch.reset_index(drop=True)
        images: list[bytes | None] = [None] * len(batch)
        # Rows arrive in (unit, seed) order. Consecutive rows drawn by the same model (one unit,
        # or every vanilla unit, or units borrowing one lender) share UNet batches; prompts
        # may differ row by row.
        model = batch["artifact_kind"] + ":" + batch["artifact"] + ":" + batch["model_strength"].astype(str)
        model_runs = (model != model.shift()).cumsum()
        # Where the call's time goes, for benchmarks/pipeline_breakdown.py: model switches,
        # sampling (text encoding, denoising, VAE decoding) and PNG encoding.
        seconds = {"switch_seconds": 0.0, "sampling_seconds": 0.0, "png_seconds": 0.0}
        for _, run_rows in batch.groupby(model_runs, sort=False):
            first = run_rows.iloc[0]
            tick = time.perf_counter()
            unet, prompts = self.models.activate(
                first["artifact"], first["artifact_kind"], float(first["model_strength"])
            )
            seconds["switch_seconds"] += time.perf_counter() - tick
            for start in range(0, len(run_rows), self.gen.batch_size):
                chunk = run_rows.iloc[start : start + self.gen.batch_size]
                tick = time.perf_counter()
                pixels = sample_images(
                    unet, self.vae, self.scheduler, prompts,
                    chunk["prompt"].tolist(), chunk["negative_prompt"].tolist(),
                    chunk["seed"].tolist(), self.gen.steps, self.gen.guidance_scale,
                )
                tock = time.perf_counter()
                for position, image in zip(chunk.index, pixels, strict=True):
                    images[position] = encode_png(image)
                seconds["sampling_seconds"] += tock - tick
                seconds["png_seconds"] += time.perf_counter() - tock
        out = batch[["shard", "label", "attribute", "group", "unit", "cluster", "seed", "prompt", "negative_prompt"]].copy()
        out.insert(1, "image", images)
        out["method"] = self.method
        out["base_model"] = self.base_model
        out["score"] = np.nan  # filled in by the filter stage
        out["kept"] = True
        # Timing columns for the stage's throughput figures; the writer drops them from the shard.
        out["sampling_started"] = started
        for name, value in seconds.items():
            out[name] = value / max(len(out), 1)  # spread over the rows, so shards sum them back
        log.debug("sampled %d images in %.1fs (%d model switches so far)", len(out), time.time() - started,
                  self.models.switches)
        return out
