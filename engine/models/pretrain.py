"""Pretraining the embedded tiny models on the built-in base corpus (jobs/pretrain_tiny.py
runs it; the results ship in the package as ``engine/models/tiny_sd`` and ``tiny_clip``).

Phases, run in order (:attr:`PretrainSettings.phases` picks some):
  vae   AutoencoderKL, 32 px -> 8x8x4; then the whole corpus is encoded to latents once.
  unet  UNet2DConditionModel and CLIPTextModel, trained jointly on the cached latents with
        caption dropout (the empty prompt is the unconditional one, for classifier-free
        guidance); an EMA of both is what ships, in diffusers format.
  clip  the tiny contrastive image/text encoder.
  judge the built-in benchmark's learned fidelity judge (engine.models.judge), trained on
        benchmark renders, not on the base corpus: it judges, it generates nothing.

Each phase keeps its result in ``work_dir``, so a re-run after a crash skips finished phases.
With ``init_from`` the vae phase only encodes the corpus with that model's VAE, and the unet
phase continues from its UNet and text encoder; pretrain.json keeps the lineage.
Outputs are written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.errors import FairsynthError
from engine.models import tiny
from engine.models.tokenizer import build_clip_tokenizer, write_clip_vocab_files
from engine.stages.data.builtin import BACKGROUNDS, OBJECTS, base_corpus, caption
from engine.storage import atomic_local_directory

log = logging.getLogger(__name__)

PHASES = ("vae", "unet", "clip", "judge")
DEFAULT_WORK_DIR = Path("runs/pretrain_tiny")


def _knob(default, doc: str, kind: type | None = None):
    """A setting with the help text its command-line option shows (and the type it parses to,
    where the default does not tell it)."""
    return field(default=default, metadata={"help": doc, "type": kind})


@dataclass
class PretrainSettings:
    """Every setting of the tiny models' pretraining; the defaults made the shipped models."""

    phases: tuple[str, ...] = _knob(PHASES, "a subset of vae, unet, clip, judge")
    out_sd: Path = field(default_factory=tiny.tiny_model_path, metadata={"help": "where the tiny SD ships"})
    out_clip: Path = field(default_factory=tiny.tiny_clip_path, metadata={"help": "where the tiny CLIP ships"})
    out_judge: Path = field(default_factory=lambda: _judge_path(), metadata={"help": "where the learned judge ships"})
    work_dir: Path = _knob(DEFAULT_WORK_DIR, "each phase's result, kept so a re-run skips it")
    seed: int = 0
    corpus_size: int = 20000
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 4000
    unet_batch: int = 128
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    clip_corpus_size: int = 8000
    clip_steps: int = 800
    clip_batch: int = 96
    clip_lr: float = 2e-3
    judge_renders_per_group: int = 4000
    judge_steps: int = 3000
    max_minutes_vae: float | None = _knob(None, "end the VAE phase after this long, its learning rate fully decayed")
    max_minutes_unet: float | None = _knob(None, "as --max-minutes-vae, for the UNet phase")
    max_minutes_clip: float | None = _knob(None, "as --max-minutes-vae, for the CLIP phase")
    init_from: Path | None = _knob(
        None, "continue from this tiny SD folder: reuse its VAE, start the UNet and text encoder "
        "from its weights (e.g. to teach a shipped model new caption words)", kind=Path)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.phases) - set(PHASES))
        if unknown:
            raise FairsynthError(f"phases: unknown phase(s) {unknown}; expected a subset of {','.join(PHASES)}")

    def smoke(self) -> PretrainSettings:
        """A few steps of every phase on a tiny corpus, in a work folder of its own unless one
        was given: a check that the whole path runs, not a model."""
        work_dir = Path("runs/pretrain_tiny_smoke") if self.work_dir == DEFAULT_WORK_DIR else self.work_dir
        # A smoke judge never replaces the shipped one unless asked to.
        out_judge = work_dir / "judge" if self.out_judge == _judge_path() else self.out_judge
        return replace(self, out_judge=out_judge, corpus_size=256, clip_corpus_size=256, vae_steps=4, unet_steps=4, clip_steps=4,
                       vae_batch=8, unet_batch=16, clip_batch=16, judge_renders_per_group=16, judge_steps=4,
                       work_dir=work_dir)


def run_pretraining(settings: PretrainSettings) -> dict[str, dict]:
    """Run the chosen phases in order; returns each phase's stats by name."""
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    if "vae" in settings.phases or "unet" in settings.phases:
        corpus = base_corpus(settings.corpus_size, seed=settings.seed)
        if "vae" in settings.phases:
            stats["vae"] = run_vae_phase(settings, corpus)
        if "unet" in settings.phases:
            stats["unet"] = run_unet_phase(settings, corpus)
    if "clip" in settings.phases:
        stats["clip"] = run_clip_phase(settings)
    if "judge" in settings.phases:
        stats["judge"] = run_judge_phase(settings)
    return stats


class PhaseSchedule:
    """Warmup then cosine learning-rate decay over a phase of ``steps`` steps.

    With ``max_minutes``, progress is the larger of the step fraction and the time fraction, so
    a phase on a busy machine still decays its learning rate fully and ends on time (the step
    count it reaches then depends on the machine; without it, runs are step-for-step
    reproducible).
    """

    def __init__(self, optimizer, lr: float, steps: int, warmup: int, max_minutes: float | None):
        self.optimizer, self.lr, self.steps, self.warmup = optimizer, lr, steps, warmup
        self.max_seconds = None if max_minutes is None else 60.0 * max_minutes
        self.start = time.monotonic()

    def progress(self, step: int) -> float:
        fraction = step / self.steps
        if self.max_seconds is not None:
            fraction = max(fraction, (time.monotonic() - self.start) / self.max_seconds)
        return fraction

    def begin_step(self, step: int) -> bool:
        """Set this step's learning rate; False once the phase is over."""
        progress = self.progress(step)
        if progress >= 1.0:
            return False
        if step < self.warmup:
            factor = (step + 1) / self.warmup
        else:
            factor = 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress))
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * factor
        return True


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float [n, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def progress(steps: int, desc: str):
    return tqdm(range(steps), desc=desc, mininterval=10.0, smoothing=0.05, file=sys.stderr,
                ascii=True)


# --------------------------------------------------------------------------- vae


def train_vae(settings: PretrainSettings, images: np.ndarray):
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    vae = tiny.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    sched = PhaseSchedule(opt, settings.vae_lr, settings.vae_steps, min(100, settings.vae_steps),
                          settings.max_minutes_vae)
    x_all = to_unit_range(images)
    bar, done = progress(settings.vae_steps, "vae"), 0
    for step in bar:
        if not sched.begin_step(step):
            break
        x = x_all[rng.integers(0, len(x_all), settings.vae_batch)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec_loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        loss = rec_loss + settings.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        done = step + 1
        if step % 25 == 0:
            bar.set_postfix(rec=f"{rec_loss.item():.4f}")
    bar.close()
    vae.eval()
    return vae, done


@torch.no_grad()
def encode_corpus(vae, images: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray, float]:
    """Posterior means and standard deviations of every image, and the reconstruction MSE."""
    means, stds, errs = [], [], []
    for i in range(0, len(images), chunk):
        x = to_unit_range(images[i : i + chunk])
        dist = vae.encode(x).latent_dist
        means.append(dist.mean.numpy())
        stds.append(dist.std.numpy())
        errs.append(F.mse_loss(vae.decode(dist.mean).sample, x, reduction="sum").item())
    mse = sum(errs) / (images.size)
    return np.concatenate(means), np.concatenate(stds), mse


def run_vae_phase(settings: PretrainSettings, corpus) -> dict:
    """Train the VAE and encode the corpus into ``work_dir/vae``; returns its stats (those of the
    earlier run when that folder is complete)."""
    out = settings.work_dir / "vae"
    if (out / "done.json").exists():
        log.info("vae: reusing %s", out)
        return json.loads((out / "done.json").read_text())
    t0 = time.time()
    if settings.init_from is None:
        vae, steps_done = train_vae(settings, corpus.images)
    else:
        vae, steps_done = load_part(settings.init_from, "vae"), 0
    mean, std, mse = encode_corpus(vae, corpus.images)
    # A reused VAE keeps the scaling its UNet was trained with.
    scaling = float(1.0 / mean.std()) if settings.init_from is None else vae.config.scaling_factor
    vae.register_to_config(scaling_factor=scaling)
    stats = {"recon_mse": mse, "scaling_factor": scaling, "steps": steps_done,
             "seconds": round(time.time() - t0, 1)}
    if settings.init_from is not None:
        stats["reused_from"] = str(settings.init_from)
    with atomic_local_directory(out) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        np.savez(tmp / "latents.npz", mean=mean, std=std)
        (tmp / "done.json").write_text(json.dumps(stats, indent=1))
    return stats


def load_part(folder: Path, part: str):
    """One trained part (vae, unet, text_encoder) of a tiny SD folder, in train mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    classes = {"vae": AutoencoderKL, "unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}
    if not (Path(folder) / part).is_dir():
        raise FairsynthError(f"init_from: {folder} has no {part}/ folder; give a tiny SD folder "
                             f"such as {tiny.tiny_model_path()}")
    return classes[part].from_pretrained(Path(folder) / part, use_safetensors=True).train()


# --------------------------------------------------------------------------- unet


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(p, 1.0 - decay)


def train_unet(settings: PretrainSettings, corpus, latent_mean: np.ndarray, latent_std: np.ndarray, scaling: float):
    from diffusers.training_utils import compute_snr

    torch.manual_seed(settings.seed + 1)
    rng = np.random.default_rng(settings.seed + 1)
    tokenizer = build_clip_tokenizer()
    if settings.init_from is None:
        unet, text_encoder = tiny.build_unet(), tiny.build_text_encoder()
    else:
        unet, text_encoder = load_part(settings.init_from, "unet"), load_part(settings.init_from, "text_encoder")
    noise_sched = tiny.build_training_scheduler()

    # Few distinct captions: encode each once per step and gather, the last one is "".
    prompts = sorted(set(corpus.captions)) + [""]
    caption_index = torch.tensor([prompts.index(c) for c in corpus.captions])
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    mean, std = torch.from_numpy(latent_mean), torch.from_numpy(latent_std)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=settings.unet_lr, weight_decay=1e-2)
    sched = PhaseSchedule(opt, settings.unet_lr, settings.unet_steps, min(200, settings.unet_steps),
                          settings.max_minutes_unet)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    bar, done = progress(settings.unet_steps, "unet"), 0
    for step in bar:
        if not sched.begin_step(step):
            break
        idx = torch.from_numpy(rng.integers(0, len(mean), settings.unet_batch))
        latents = (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * scaling
        cond = caption_index[idx].clone()
        cond[torch.rand(len(cond)) < settings.caption_dropout] = len(prompts) - 1
        hidden = text_encoder(ids).last_hidden_state[cond]
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(latents),))
        pred = unet(noise_sched.add_noise(latents, noise, t), t, hidden).sample
        # Min-SNR-5 weighting: converges faster than plain epsilon MSE.
        snr = compute_snr(noise_sched, t)
        weight = snr.clamp(max=5.0) / snr
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        done = step + 1
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return ema_unet, ema_text, tokenizer, done


def run_unet_phase(settings: PretrainSettings, corpus) -> dict:
    """Train the UNet and text encoder on the VAE phase's latents and ship the pipeline to
    ``out_sd``; returns the UNet's stats."""
    from diffusers import AutoencoderKL

    vae_dir = settings.work_dir / "vae"
    if not (vae_dir / "done.json").exists():
        raise FairsynthError(f"the unet phase needs a trained VAE in {vae_dir}; run --phases vae first")
    t0 = time.time()
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval()
    lat = np.load(vae_dir / "latents.npz")
    if len(lat["mean"]) != len(corpus.images):
        raise FairsynthError(f"{vae_dir} holds latents of another corpus; delete it and re-run --phases vae")
    # Read before training: the result may replace the folder it continues from.
    lineage = None
    if settings.init_from is not None:
        earlier = Path(settings.init_from) / "pretrain.json"
        lineage = json.loads(earlier.read_text()) if earlier.is_file() else {"folder": str(settings.init_from)}
    unet, text_encoder, tokenizer, steps_done = train_unet(
        settings, corpus, lat["mean"], lat["std"], vae.config.scaling_factor
    )
    pipe = tiny.assemble_pipeline(vae, unet, text_encoder, tokenizer)
    stats = json.loads((vae_dir / "done.json").read_text())
    info = {
        "seed": settings.seed,
        "corpus_size": settings.corpus_size,
        "vae": stats,
        "unet": {"steps": steps_done, "batch": settings.unet_batch, "lr": settings.unet_lr,
                 "caption_dropout": settings.caption_dropout, "ema_decay": settings.ema_decay,
                 "seconds": round(time.time() - t0, 1)},
        "parameters": {name: tiny.count_parameters(m) for name, m in
                       (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))},
    }
    info["captions"] = "varied: sub-type, class or attribute words (engine.stages.data.builtin.varied_caption)"
    if lineage is not None:
        info["continued_from"] = lineage
    save_tiny_sd(pipe, settings.out_sd, info)
    return info["unet"]


def save_tiny_sd(pipe, out: Path, info: dict) -> None:
    with atomic_local_directory(Path(out)) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        _finish_tiny_sd_folder(tmp, info)


def _finish_tiny_sd_folder(tmp: Path, info: dict) -> None:
    """Complete a saved pipeline folder, and check it loads offline and samples before it
    replaces the shipped one."""
    from diffusers import StableDiffusionPipeline

    # Stable Diffusion 1.x tokenizer folders hold vocab.json and merges.txt, not tokenizer.json.
    (tmp / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    write_clip_vocab_files(tmp / "tokenizer")
    (tmp / "pretrain.json").write_text(json.dumps(info, indent=1))
    for path in tmp.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    check = StableDiffusionPipeline.from_pretrained(tmp, safety_checker=None, use_safetensors=True,
                                                    local_files_only=True)
    check.set_progress_bar_config(disable=True)
    ids = check.tokenizer("a photo of a cat").input_ids
    if ids != [49406, 320, 1125, 539, 320, 2368, 49407]:
        raise FairsynthError(f"the saved tokenizer in {tmp} gives {ids} for 'a photo of a cat'")
    images = check([caption(OBJECTS[0], BACKGROUNDS[0])], num_inference_steps=4, height=32,
                   width=32, output_type="np").images
    if not np.isfinite(images).all():
        raise FairsynthError(f"the saved pipeline in {tmp} samples non-finite images")


# --------------------------------------------------------------------------- clip


def run_clip_phase(settings: PretrainSettings) -> dict:
    """Train the tiny CLIP on its own corpus and ship it to ``out_clip``; returns its stats."""
    from engine.models.encoders import TinyClipEncoder, subtype_nmi, train_tiny_clip

    t0 = time.time()
    corpus = base_corpus(settings.clip_corpus_size, seed=settings.seed + 2)
    with atomic_local_directory(Path(settings.out_clip)) as tmp:
        stats = train_tiny_clip(corpus, tmp, steps=settings.clip_steps, batch_size=settings.clip_batch,
                                lr=settings.clip_lr, seed=settings.seed + 2,
                                progress=lambda n: progress(n, "clip"),
                                max_minutes=settings.max_minutes_clip)
        stats["seconds"] = round(time.time() - t0, 1)
        # Does k-means on its embeddings of benchmark-style images find the object sub-types?
        nmi = subtype_nmi(TinyClipEncoder(tmp), per_pair=20, seed=settings.seed + 3)
        stats["benchmark_subtype_nmi"] = {k: round(v, 4) if isinstance(v, float) else
                                          {g: round(x, 4) for g, x in v.items()} for k, v in nmi.items()}
        (tmp / "training.json").write_text(json.dumps(stats, indent=1))
        for path in tmp.iterdir():
            path.chmod(0o644)
    return stats


# --------------------------------------------------------------------------- judge


def _judge_path() -> Path:
    from engine.models.judge import judge_path

    return judge_path()


def run_judge_phase(settings: PretrainSettings) -> dict:
    """Train the learned fidelity judge and ship it to ``out_judge``; returns its report."""
    from engine.models.judge import train_judge

    t0 = time.time()
    report = train_judge(settings.out_judge, per_group=settings.judge_renders_per_group, steps=settings.judge_steps,
                         seed=settings.seed + 4, progress=lambda n: progress(n, "judge"))
    report["seconds"] = round(time.time() - t0, 1)
    return report
