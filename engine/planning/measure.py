"""Measure each stage's achieved fraction of peak (MFU) on the device this runs on.

Each stage's kernel mix runs with random weights of the configured models (speed does not
depend on weights) at the config's batch sizes, the way its stage runs it: sampling goes
through the generate stage's own ``sample_images``; fine-tuning steps the UNet as the unit
trainer does (latents encoded beforehand, fp32 trainable weights under fp16 autocast on GPUs,
gradient checkpointing, a second UNet call for DreamBooth's prior term); training steps the
classifier under the train loop's autocast; the encoders embed one batch. FLOPs are the
planner's own counts, so the MFU measured here is the one the planner divides by.

``jobs/plan.py --measure --save`` writes the result where the planner reads it
(``plan.results_dir/plan_mfu.json``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.config import Config
from engine.generation_methods import GenerationMethod, get_method, method_names
from engine.planning import flops as F
from engine.planning.hardware import CPU, GPU_PEAK_TFLOPS, cpu_matmul_peak, device_kind

log = logging.getLogger(__name__)

RESULT_NAME = "plan_mfu"
# What the finetune stage is measured with when the config trains no method.
UNCONFIGURED_MEASURE = "lora"


@dataclass
class Bench:
    """Where and how long to measure."""

    device: str
    dtype: torch.dtype
    min_seconds: float
    quick: bool

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def autocast(self, dtype: torch.dtype):
        return torch.autocast("cuda", dtype=dtype) if self.cuda else torch.autocast("cpu", enabled=False)

    def seconds_per_call(self, fn: Callable[[], object], warmup: int = 1, max_reps: int = 50) -> float:
        """Mean seconds per call after ``warmup`` calls, repeating until min_seconds pass."""
        for _ in range(warmup):
            fn()
        self.sync()
        reps, start = 0, time.perf_counter()
        while reps < max_reps and (reps == 0 or time.perf_counter() - start < self.min_seconds):
            fn()
            reps += 1
        self.sync()
        return (time.perf_counter() - start) / reps


def _prompt_context(shapes: F.DiffusionShapes, bench: Bench) -> torch.Tensor:
    text = F.build_text_encoder(shapes.text_encoder, bench.device).to(bench.dtype).eval()
    ids = torch.zeros(1, shapes.text_length, dtype=torch.long, device=bench.device)
    with torch.no_grad():
        return text(ids)[0]


def measure_generate(cfg: Config, shapes: F.DiffusionShapes, bench: Bench) -> tuple[float, float, dict]:
    """One batch through the generate stage's sampler; prompts are encoded once, as the
    sampler's prompt cache does."""
    from engine.models import tiny
    from engine.stages.generate.sampler import make_scheduler, sample_images

    gen = cfg.generate
    unet = F.build_unet(shapes.unet, bench.device).to(bench.dtype).eval()
    vae = F.build_vae(shapes.vae, bench.device).to(bench.dtype).eval()
    context = _prompt_context(shapes, bench)
    scheduler = make_scheduler(gen.scheduler, tiny.scheduler_config())
    steps = 2 if bench.quick else gen.steps

    def sample():
        sample_images(unet, vae, scheduler, lambda prompts: context.expand(len(prompts), -1, -1),
                      ["p"] * gen.batch_size, [""] * gen.batch_size, list(range(gen.batch_size)),
                      steps, gen.guidance_scale)

    seconds = bench.seconds_per_call(sample, warmup=1, max_reps=3)
    latent = shapes.native_size // shapes.vae_scale
    calls = 2 if gen.guidance_scale > 1.0 else 1
    per_image = steps * calls * F.unet_forward(shapes, latent) + F.vae_decode(shapes, latent)
    return seconds, gen.batch_size * per_image, {"batch": gen.batch_size, "steps": steps}


def _finetune_step(cfg: Config, shapes: F.DiffusionShapes, bench: Bench, method: GenerationMethod,
                   checkpointing: bool, context: torch.Tensor) -> float:
    ft = cfg.finetune
    latent = shapes.native_size // shapes.vae_scale  # fine-tuning runs at the native resolution
    unet = F.build_unet(shapes.unet, bench.device)
    unet.train()
    if method.trains_lora(ft):
        unet.to(bench.dtype)  # the frozen base in half; the method keeps its adapters in fp32
    text_encoder = F.build_text_encoder(shapes.text_encoder, bench.device)
    params = method.make_trainable(unet, text_encoder, ft)  # what the unit trainer trains
    if checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    scaler = torch.amp.GradScaler("cuda") if bench.cuda else None
    cond = context.expand(ft.batch_size, -1, -1)
    shape = (ft.batch_size, unet.config.in_channels, latent, latent)
    unet_calls = method.unet_calls_per_step(ft)

    def step():
        loss = torch.zeros((), device=bench.device)
        for _ in range(unet_calls):
            latents = torch.randn(shape, device=bench.device)
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (ft.batch_size,), device=bench.device)
            with bench.autocast(torch.float16):
                pred = unet(latents + noise, t, cond).sample
            loss = loss + torch.nn.functional.mse_loss(pred.float(), noise)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return bench.seconds_per_call(step, warmup=2 if bench.cuda else 1, max_reps=20)


def measure_finetune(cfg: Config, shapes: F.DiffusionShapes, bench: Bench) -> tuple[float, float, dict]:
    """One step of each configured method family (LoRA; DreamBooth with its prior term)."""
    ft = cfg.finetune
    latent = shapes.native_size // shapes.vae_scale  # fine-tuning runs at the native resolution
    checkpointing = ft.gradient_checkpointing and bench.cuda
    trained = [get_method(m) for m in method_names() if m in cfg.methods and get_method(m).trains]
    families: dict[str, GenerationMethod] = {}
    for method in trained or [get_method(UNCONFIGURED_MEASURE)]:
        families.setdefault(method.cost_family, method)
    context = _prompt_context(shapes, bench)
    seconds, flop, details = 0.0, 0.0, {}
    for family, method in families.items():
        lora_rank = ft.lora_rank if method.trains_lora(ft) else None
        step_seconds = _finetune_step(cfg, shapes, bench, method, checkpointing, context)
        step_flops = method.unet_calls_per_step(ft) * ft.batch_size * F.unet_train_step(shapes, latent, lora_rank, checkpointing)
        details[family] = {"seconds_per_step": step_seconds, "flops_per_step": step_flops}
        seconds += step_seconds
        flop += step_flops
        if bench.cuda:
            torch.cuda.empty_cache()
    return seconds, flop, details


def measure_train(cfg: Config, bench: Bench) -> tuple[float, float, dict]:
    """One training step of the classifier at the per-worker batch."""
    from engine.resources import train_workers
    from engine.stages.train.backbones import build_classifier

    tr = cfg.train
    # 'auto' workers measured as on one 8-GPU node, the presets' usual unit.
    per_worker = max(2, tr.batch_size // train_workers(cfg, {"GPU": 8.0, "CPU": float("inf")}))
    with torch.device(bench.device):
        classifier = build_classifier(tr.backbone, 2)
    classifier.train()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-4)
    images = torch.rand(per_worker, 3, tr.image_size, tr.image_size, device=bench.device)
    labels = torch.randint(0, 2, (per_worker,), device=bench.device)

    def step():
        with bench.autocast(torch.bfloat16):
            logits, features = classifier(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels) + features.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = bench.seconds_per_call(step, warmup=2)
    return seconds, per_worker * F.classifier_step(tr.backbone, 2, tr.image_size, "train"), {"batch": per_worker}


def measure_encoder(encoder: F.EncoderShapes, batch: int, bench: Bench) -> tuple[float, float, dict]:
    """One batch through the cluster/filter encoder's image tower."""
    tower = F.build_image_tower(encoder, bench.device).to(bench.dtype).eval()
    pixels = torch.rand(batch, 3, encoder.image_size, encoder.image_size, device=bench.device, dtype=bench.dtype)
    with torch.no_grad():
        seconds = bench.seconds_per_call(lambda: tower(pixels))
    return seconds, batch * F.image_encoder_forward(encoder), {"batch": batch}


def measure_stage_mfu(cfg: Config, quick: bool = False) -> dict:
    """Seconds, counted FLOPs, achieved TFLOP/s and MFU per stage on this machine's device,
    as one JSON-ready result in the benchmarks' format. On a CPU it measures one core (one
    PyTorch thread), the unit a CPU plan schedules tasks on."""
    cuda = torch.cuda.is_available() and cfg.model.device != "cpu"
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)
    try:
        return _measure(cfg, quick, cuda)
    finally:
        torch.set_num_threads(threads)


def _measure(cfg: Config, quick: bool, cuda: bool) -> dict:
    bench = Bench("cuda" if cuda else "cpu", torch.float16 if cuda else torch.float32, 0.5 if quick else 3.0, quick)
    name = torch.cuda.get_device_name() if cuda else "cpu (1 thread)"
    kind = device_kind(name)
    peak = (GPU_PEAK_TFLOPS.get(kind or "", 0.0) * 1e12 or None) if cuda else cpu_matmul_peak()
    shapes, encoder = F.diffusion_shapes(cfg.model), F.encoder_shapes(cfg.model)
    torch.manual_seed(0)
    measured = {
        "generate": lambda: measure_generate(cfg, shapes, bench),
        "finetune": lambda: measure_finetune(cfg, shapes, bench),
        "train": lambda: measure_train(cfg, bench),
        "cluster": lambda: measure_encoder(encoder, cfg.cluster.batch_size, bench),
        "filter": lambda: measure_encoder(encoder, cfg.filter.batch_size, bench),
    }
    stages = {}
    for stage, run in measured.items():
        seconds, flop, extra = run()
        achieved = flop / seconds
        stages[stage] = {"seconds": seconds, "flops": flop, "achieved_tflops": achieved / 1e12,
                         "mfu": achieved / peak if peak else None, **extra}
        log.info("%s: %.3g s per call, %.3g TFLOP/s achieved", stage, seconds, achieved / 1e12)
        if cuda:
            torch.cuda.empty_cache()
    headline = stages["generate"]
    return {
        "benchmark": RESULT_NAME,
        "metric": "generate_mfu" if peak else "generate_achieved_tflops",
        "value": headline["mfu"] if peak else headline["achieved_tflops"],
        "device": name,
        "kind": kind or (None if cuda else CPU),
        "peak_tflops": peak / 1e12 if peak else None,
        "models": {"diffusion": shapes.source, "encoder": encoder.source, "classifier": cfg.train.backbone},
        "mfu": {s: r["mfu"] for s, r in stages.items() if r["mfu"] is not None},
        "achieved_tflops": {s: r["achieved_tflops"] for s, r in stages.items()},
        "stages": stages,
    }
