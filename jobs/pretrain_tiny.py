"""Pretrain the embedded tiny models on the built-in base corpus and ship them in the package.

Phases, run in order (``--phases`` picks some):
  vae   AutoencoderKL, 32 px -> 8x8x4; then the whole corpus is encoded to latents once.
  unet  UNet2DConditionModel and CLIPTextModel, trained jointly on the cached latents with
        caption dropout (the empty prompt is the unconditional one, for classifier-free
        guidance); an EMA of both is what ships, in diffusers format, to engine/models/tiny_sd.
  clip  the tiny contrastive image/text encoder, shipped to engine/models/tiny_clip.

Each phase keeps its result in --work-dir, so a re-run after a crash skips finished phases.
Outputs are written to a temporary folder and renamed into place.

    python jobs/pretrain_tiny.py                                  # everything, ~1 h on 2 cores
    python jobs/pretrain_tiny.py --phases clip                    # only the tiny CLIP
    python jobs/pretrain_tiny.py --smoke --out-sd /tmp/sd --out-clip /tmp/clip
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.data.builtin import BACKGROUNDS, OBJECTS, base_corpus, caption  # noqa: E402
from engine.models import tiny  # noqa: E402
from engine.models.tokenizer import build_clip_tokenizer, write_clip_vocab_files  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", default="vae,unet,clip", help="comma-separated subset of vae,unet,clip")
    p.add_argument("--out-sd", type=Path, default=tiny.tiny_model_path())
    p.add_argument("--out-clip", type=Path, default=tiny.tiny_clip_path())
    p.add_argument("--work-dir", type=Path, default=Path("runs/pretrain_tiny"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--corpus-size", type=int, default=20000)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl-weight", type=float, default=1e-6)
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--unet-batch", type=int, default=128)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--clip-corpus-size", type=int, default=8000)
    p.add_argument("--clip-steps", type=int, default=800)
    p.add_argument("--clip-batch", type=int, default=96)
    p.add_argument("--clip-lr", type=float, default=2e-3)
    p.add_argument("--max-minutes-vae", type=float, default=None,
                   help="end the VAE phase after this long, its learning rate fully decayed")
    p.add_argument("--max-minutes-unet", type=float, default=None)
    p.add_argument("--max-minutes-clip", type=float, default=None)
    p.add_argument("--smoke", action="store_true", help="a few steps of every phase on a tiny corpus")
    args = p.parse_args(argv)
    args.phases = [s.strip() for s in args.phases.split(",") if s.strip()]
    unknown = set(args.phases) - {"vae", "unet", "clip"}
    if unknown:
        p.error(f"--phases: unknown phase(s) {sorted(unknown)}; expected a subset of vae,unet,clip")
    if args.smoke:
        args.corpus_size, args.vae_steps, args.unet_steps, args.clip_steps = 256, 4, 4, 4
        args.clip_corpus_size = 256
        args.vae_batch, args.unet_batch, args.clip_batch = 8, 16, 16
        if args.work_dir == Path("runs/pretrain_tiny"):
            args.work_dir = Path("runs/pretrain_tiny_smoke")
    return args


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


def atomic_replace(tmp: Path, out: Path) -> None:
    """Move a finished temporary folder to ``out``, replacing what was there."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- vae


def train_vae(args, images: np.ndarray):
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    vae = tiny.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = PhaseSchedule(opt, args.vae_lr, args.vae_steps, min(100, args.vae_steps),
                          args.max_minutes_vae)
    x_all = to_unit_range(images)
    bar, done = progress(args.vae_steps, "vae"), 0
    for step in bar:
        if not sched.begin_step(step):
            break
        x = x_all[rng.integers(0, len(x_all), args.vae_batch)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec_loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        loss = rec_loss + args.vae_kl_weight * posterior.kl().mean()
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


def run_vae_phase(args, corpus) -> None:
    out = args.work_dir / "vae"
    if (out / "done.json").exists():
        print(f"vae: reusing {out}", flush=True)
        return
    t0 = time.time()
    vae, steps_done = train_vae(args, corpus.images)
    mean, std, mse = encode_corpus(vae, corpus.images)
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    tmp = args.work_dir / f".vae.tmp-{os.getpid()}"
    vae.save_pretrained(tmp, safe_serialization=True)
    np.savez(tmp / "latents.npz", mean=mean, std=std)
    stats = {"recon_mse": mse, "scaling_factor": scaling, "steps": steps_done,
             "seconds": round(time.time() - t0, 1)}
    (tmp / "done.json").write_text(json.dumps(stats, indent=1))
    atomic_replace(tmp, out)
    print(f"vae: {json.dumps(stats)}", flush=True)


# --------------------------------------------------------------------------- unet


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(p, 1.0 - decay)


def train_unet(args, corpus, latent_mean: np.ndarray, latent_std: np.ndarray, scaling: float):
    from diffusers.training_utils import compute_snr

    torch.manual_seed(args.seed + 1)
    rng = np.random.default_rng(args.seed + 1)
    tokenizer = build_clip_tokenizer()
    unet, text_encoder = tiny.build_unet(), tiny.build_text_encoder()
    noise_sched = tiny.build_training_scheduler()

    # Few distinct captions: encode each once per step and gather, the last one is "".
    prompts = sorted(set(corpus.captions)) + [""]
    caption_index = torch.tensor([prompts.index(c) for c in corpus.captions])
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    mean, std = torch.from_numpy(latent_mean), torch.from_numpy(latent_std)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2)
    sched = PhaseSchedule(opt, args.unet_lr, args.unet_steps, min(200, args.unet_steps),
                          args.max_minutes_unet)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    bar, done = progress(args.unet_steps, "unet"), 0
    for step in bar:
        if not sched.begin_step(step):
            break
        idx = torch.from_numpy(rng.integers(0, len(mean), args.unet_batch))
        latents = (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * scaling
        cond = caption_index[idx].clone()
        cond[torch.rand(len(cond)) < args.caption_dropout] = len(prompts) - 1
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
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return ema_unet, ema_text, tokenizer, done


def run_unet_phase(args, corpus) -> None:
    from diffusers import AutoencoderKL

    vae_dir = args.work_dir / "vae"
    if not (vae_dir / "done.json").exists():
        raise SystemExit(f"unet phase needs a trained VAE in {vae_dir}; run --phases vae first")
    t0 = time.time()
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval()
    lat = np.load(vae_dir / "latents.npz")
    if len(lat["mean"]) != len(corpus.images):
        raise SystemExit(f"{vae_dir} holds latents of another corpus; delete it and re-run vae")
    unet, text_encoder, tokenizer, steps_done = train_unet(
        args, corpus, lat["mean"], lat["std"], vae.config.scaling_factor
    )
    pipe = tiny.assemble_pipeline(vae, unet, text_encoder, tokenizer)
    stats = json.loads((vae_dir / "done.json").read_text())
    info = {
        "seed": args.seed,
        "corpus_size": args.corpus_size,
        "vae": stats,
        "unet": {"steps": steps_done, "batch": args.unet_batch, "lr": args.unet_lr,
                 "caption_dropout": args.caption_dropout, "ema_decay": args.ema_decay,
                 "seconds": round(time.time() - t0, 1)},
        "parameters": {name: tiny.count_parameters(m) for name, m in
                       (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))},
    }
    save_tiny_sd(pipe, args.out_sd, info)
    print(f"unet: saved {args.out_sd} {json.dumps(info['unet'])}", flush=True)


def save_tiny_sd(pipe, out: Path, info: dict) -> None:
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # Stable Diffusion 1.x tokenizer folders hold vocab.json and merges.txt, not tokenizer.json.
    (tmp / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    write_clip_vocab_files(tmp / "tokenizer")
    (tmp / "pretrain.json").write_text(json.dumps(info, indent=1))
    for path in tmp.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    # Check the folder loads offline and samples before it replaces the shipped one.
    check = StableDiffusionPipeline.from_pretrained(tmp, safety_checker=None, use_safetensors=True,
                                                    local_files_only=True)
    check.set_progress_bar_config(disable=True)
    ids = check.tokenizer("a photo of a cat").input_ids
    if ids != [49406, 320, 1125, 539, 320, 2368, 49407]:
        raise SystemExit(f"the saved tokenizer in {tmp} gives {ids} for 'a photo of a cat'")
    images = check([caption(OBJECTS[0], BACKGROUNDS[0])], num_inference_steps=4, height=32,
                   width=32, output_type="np").images
    if not np.isfinite(images).all():
        raise SystemExit(f"the saved pipeline in {tmp} samples non-finite images")
    atomic_replace(tmp, out)


# --------------------------------------------------------------------------- clip


def run_clip_phase(args) -> None:
    from engine.models.encoders import TinyClipEncoder, subtype_nmi, train_tiny_clip

    t0 = time.time()
    corpus = base_corpus(args.clip_corpus_size, seed=args.seed + 2)
    out = Path(args.out_clip)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    stats = train_tiny_clip(corpus, tmp, steps=args.clip_steps, batch_size=args.clip_batch,
                            lr=args.clip_lr, seed=args.seed + 2,
                            progress=lambda n: progress(n, "clip"),
                            max_minutes=args.max_minutes_clip)
    stats["seconds"] = round(time.time() - t0, 1)
    # Does k-means on its embeddings of benchmark-style images find the object sub-types?
    nmi = subtype_nmi(TinyClipEncoder(tmp), per_pair=20, seed=args.seed + 3)
    stats["benchmark_subtype_nmi"] = {k: round(v, 4) if isinstance(v, float) else
                                      {g: round(x, 4) for g, x in v.items()} for k, v in nmi.items()}
    (tmp / "training.json").write_text(json.dumps(stats, indent=1))
    for path in tmp.iterdir():
        path.chmod(0o644)
    atomic_replace(tmp, out)
    print(f"clip: saved {out} {json.dumps(stats)}", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if "vae" in args.phases or "unet" in args.phases:
        corpus = base_corpus(args.corpus_size, seed=args.seed)
        if "vae" in args.phases:
            run_vae_phase(args, corpus)
        if "unet" in args.phases:
            run_unet_phase(args, corpus)
    if "clip" in args.phases:
        run_clip_phase(args)
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
