"""The per-unit training loop every fine-tuning method shares, its checkpoints, and the
prior-preservation class images the base model draws.

One :class:`UnitTrainer` trains one unit: it encodes the unit's real images to latent
distributions once (the VAE is frozen), then runs the denoising objective of Stable Diffusion
(noise a latent at a random timestep, predict the noise, mean squared error), plus the
prior-preservation term on class images when the method asks for it. Only the method knows
what is trainable and what it saves (``engine/generation_methods.py``); the loop knows neither.

Real GPUs: trainable weights stay fp32 under fp16/bf16 autocast, frozen models are cast to
the autocast dtype, gradient checkpointing and 8-bit Adam (bitsandbytes) are used when
configured. On CPU everything runs in fp32.

A checkpoint is a folder. Before the last step it holds ``training_state.pt`` (the fp32
trainable tensors, optimizer, random state, losses; every draw comes from one CPU generator,
so a resumed unit continues exactly where it left off). The last step's holds only what the
stage keeps: ``artifact/`` (what the strategy saved, compact) and ``outcome.json``; a full
DreamBooth unit's weights and optimizer state (over 10 GB at SD 1.5 shapes) are not written
once training is over. A trial resumed from that checkpoint reports it again and stops.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.config import FinetuneConfig, GenerateConfig, ModelConfig
from engine.errors import FairsynthError
from engine.generation_methods import get_method
from engine.models.loading import native_size
from engine.stages.data.datasets import load_image

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
OUTCOME_FILE = "outcome.json"
ARTIFACT_DIR = "artifact"
FAILURE_MARKER = ".injected_failure"
ENCODE_BATCH = 64
# Fixed draws the search scores every trial of a unit on, so their losses compare.
HELDOUT_DRAWS = 4


@dataclass
class UnitJob:
    """Everything one trial needs; picklable, and free of run-directory paths so a trial can
    run on any node."""

    method: str
    unit: str
    sources: list[str]
    train_prompt: str
    class_prompt: str
    class_images: np.ndarray | None
    model: ModelConfig
    finetune: FinetuneConfig
    seed: int


@dataclass
class TrainOutcome:
    steps: int
    final_loss: float | None
    heldout_loss: float | None = None
    nan_at_step: int | None = None


def unit_seed(finetune_seed: int, unit: str) -> int:
    """A stable per-unit seed, so units draw unrelated noise and a re-run draws the same."""
    return int(hashlib.sha256(f"{finetune_seed}/{unit}".encode()).hexdigest()[:8], 16)


def load_trainable_pipeline(model: ModelConfig, device: str):
    """The base Stable Diffusion pipeline with fp32 weights on ``device`` (autocast trains in half)."""
    from engine.models.loading import load_base_pipeline as load

    return load(model.base, device, attention=model.attention, allow_pickle=model.allow_pickle, dtype=torch.float32)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float [n, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def encode_latent_distribution(vae, images: np.ndarray, device: str, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE's latent distribution per image (the VAE is frozen, so once)."""
    means, stds = [], []
    for start in range(0, len(images), ENCODE_BATCH):
        pixels = images_to_tensor(images[start : start + ENCODE_BATCH]).to(device, dtype)
        dist = vae.encode(pixels).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def load_unit_images(sources: list[str], size: int) -> np.ndarray:
    if not sources:
        raise FairsynthError("a training unit has 0 real images; every trained unit needs at least one")
    return np.stack([load_image(s, size) for s in sources])


class UnitTrainer:
    """Trains one unit; reports every ``finetune.checkpoint_every`` steps through ``report``."""

    def __init__(
        self,
        job: UnitJob,
        device: str,
        learning_rate: float | None = None,
        steps: int | None = None,
        score_heldout: bool = False,
        failure_marker: Path | None = None,
    ):
        self.job = job
        self.ft = job.finetune
        self.strategy = get_method(job.method)
        self.device = device
        self.learning_rate = float(learning_rate or self.strategy.learning_rate(self.ft))
        self.steps = int(steps or self.ft.steps)
        self.score_heldout = score_heldout
        self.failure_marker = failure_marker
        on_cuda = device.startswith("cuda")
        self.autocast_dtype = (
            {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.ft.mixed_precision) if on_cuda else None
        )

    # --- setup -------------------------------------------------------------------------------

    def _build(self) -> None:
        pipe = load_trainable_pipeline(self.job.model, self.device)
        self.vae, self.unet, self.text_encoder, self.tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise FairsynthError(
                f"base model {self.job.model.base!r} predicts {self.prediction_type!r}; fine-tuning supports "
                "'epsilon' and 'v_prediction' models"
            )
        self.scaling_factor = float(self.vae.config.scaling_factor)
        # Real images are trained on at the side the model draws (512 px for SD 1.5), never
        # data.image_size: training at a smaller side teaches the UNet latents it never samples.
        self.image_size = native_size(self.unet, self.vae)
        self.vae.requires_grad_(False).eval()
        # Adapters draw their initial weights from torch's global generator: seed it per unit.
        torch.manual_seed(self.job.seed)
        self.params = self.strategy.prepare(self.unet, self.text_encoder, self.ft)
        if self.autocast_dtype is not None:
            # Frozen weights run in the autocast dtype (half the memory); trainable ones stay fp32.
            self.vae.to(dtype=self.autocast_dtype)
            for module in (self.unet, self.text_encoder):
                for param in module.parameters():
                    if not param.requires_grad:
                        param.data = param.data.to(self.autocast_dtype)
        if self.ft.gradient_checkpointing and self.device != "cpu":
            self.unet.enable_gradient_checkpointing()
            if self.strategy.trains_text_encoder(self.ft):
                self.text_encoder.gradient_checkpointing_enable()
        self.unet.train()
        self.text_encoder.train(self.strategy.trains_text_encoder(self.ft))
        self.optimizer = self._optimizer()
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None

    def _optimizer(self):
        if self.ft.use_8bit_adam and self.device.startswith("cuda"):
            try:
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit(self.params, lr=self.learning_rate, weight_decay=1e-2)
            except ImportError:
                log.info("bitsandbytes is not installed; using torch AdamW")
        return torch.optim.AdamW(self.params, lr=self.learning_rate, weight_decay=1e-2)

    def _token_ids(self, prompt: str) -> torch.Tensor:
        return self.tokenizer(
            [prompt], padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)

    def _prepare_data(self) -> None:
        frozen_dtype = self.autocast_dtype or torch.float32
        images = load_unit_images(self.job.sources, self.image_size)
        mean, std = encode_latent_distribution(self.vae, images, self.device, frozen_dtype)
        generator = torch.Generator().manual_seed(self.job.seed + 1)
        self.heldout = None
        if self.score_heldout and len(mean) >= 2:
            # The search scores a held-out share of the unit's images; training never sees it.
            order = torch.randperm(len(mean), generator=generator)
            n_held = max(1, int(round(len(mean) * self.ft.heldout_fraction)))
            held, kept = order[:n_held], order[n_held:]
            self.heldout = self._fixed_draws(mean[held], generator)
            mean, std = mean[kept], std[kept]
        self.latent_mean, self.latent_std = mean, std
        self.prior = None
        if self.strategy.uses_prior(self.ft) and self.job.class_images is not None:
            self.prior = encode_latent_distribution(self.vae, self.job.class_images, self.device, frozen_dtype)
        self.instance_ids = self._token_ids(self.job.train_prompt)
        self.class_ids = self._token_ids(self.job.class_prompt)
        self.empty_ids = self._token_ids("")
        if not self.strategy.trains_text_encoder(self.ft):
            with torch.no_grad(), self._autocast():
                self.instance_text = self.text_encoder(self.instance_ids)[0]
                self.class_text = self.text_encoder(self.class_ids)[0]
                self.empty_text = self.text_encoder(self.empty_ids)[0]

    def _fixed_draws(self, latent_mean: torch.Tensor, generator: torch.Generator) -> dict:
        latents = (latent_mean * self.scaling_factor).repeat(HELDOUT_DRAWS, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        return {"latents": latents, "noise": noise, "timesteps": t.to(self.device)}

    # --- one step ----------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    def _text(self, which: str) -> torch.Tensor:
        if self.strategy.trains_text_encoder(self.ft):
            ids = {"instance": self.instance_ids, "class": self.class_ids, "empty": self.empty_ids}[which]
            with self._autocast():
                return self.text_encoder(ids)[0]
        return {"instance": self.instance_text, "class": self.class_text, "empty": self.empty_text}[which]

    def _captions(self, which: str, batch: int, generator: torch.Generator) -> torch.Tensor:
        """The caption embedding per sample, some replaced by the empty prompt
        (``finetune.caption_dropout``): the unconditional prediction that classifier-free
        guidance subtracts then moves with the fine-tuned model instead of drifting."""
        text = self._text(which).expand(batch, -1, -1)
        if self.ft.caption_dropout <= 0:
            return text
        dropped = (torch.rand(batch, generator=generator) < self.ft.caption_dropout).to(self.device)
        return torch.where(dropped[:, None, None], self._text("empty").expand(batch, -1, -1), text)

    def _sample_latents(self, mean, std, generator) -> torch.Tensor:
        index = torch.randint(0, len(mean), (self.ft.batch_size,), generator=generator).to(mean.device)
        eps = torch.randn((len(index), *mean.shape[1:]), generator=generator).to(self.device)
        return (mean[index] + std[index] * eps) * self.scaling_factor

    def _denoising_loss(self, latents, text, generator=None, noise=None, timesteps=None) -> torch.Tensor:
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator).to(self.device)
            timesteps = torch.randint(
                0, self.noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator
            ).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        with self._autocast():
            pred = self.unet(noisy, timesteps, text.expand(len(latents), -1, -1)).sample
        return F.mse_loss(pred.float(), target.float())

    def _step_loss(self, generator: torch.Generator) -> torch.Tensor:
        latents = self._sample_latents(self.latent_mean, self.latent_std, generator)
        loss = self._denoising_loss(latents, self._captions("instance", len(latents), generator), generator)
        if self.prior is not None:
            prior_latents = self._sample_latents(*self.prior, generator)
            loss = loss + self.ft.prior_loss_weight * self._denoising_loss(
                prior_latents, self._captions("class", len(prior_latents), generator), generator
            )
        return loss

    @torch.no_grad()
    def heldout_loss(self) -> float | None:
        if self.heldout is None:
            return None
        self.unet.eval()
        h = self.heldout
        text = self._text("instance")
        loss = float(self._denoising_loss(h["latents"], text, noise=h["noise"], timesteps=h["timesteps"]))
        self.unet.train()
        return loss

    # --- checkpoints -------------------------------------------------------------------------

    def _state(self, step: int, generator: torch.Generator, losses: list[float]) -> dict:
        return {
            "step": step,
            "trainable": self.strategy.trainable_state(self.unet, self.text_encoder),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "generator": generator.get_state(),
            "losses": torch.tensor(losses, dtype=torch.float64),
        }

    def _restore(self, folder: Path, generator: torch.Generator) -> tuple[int, list[float]]:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        self.strategy.load_trainable_state(self.unet, self.text_encoder, state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        return int(state["step"]), state["losses"].tolist()

    def _final_loss(self, losses: list[float]) -> float | None:
        window = losses[-min(len(losses), self.ft.checkpoint_every) :]
        return float(np.mean(window)) if window else None

    # --- the loop ----------------------------------------------------------------------------

    def run(
        self,
        report: Callable[[dict, Callable[[Path], None]], None],
        resume_from: Path | None = None,
    ) -> TrainOutcome:
        """Train to ``steps``; ``report(metrics, save)`` gets a writer for the checkpoint folder."""
        if resume_from and (Path(resume_from) / OUTCOME_FILE).is_file():
            return self._report_finished(Path(resume_from), report)
        start_time = time.perf_counter()
        started_at = time.time()
        self._build()
        self._prepare_data()
        generator = torch.Generator().manual_seed(self.job.seed)
        step, losses = (self._restore(resume_from, generator) if resume_from else (0, []))
        resumed_at = step
        if resume_from:
            log.info("unit %s resumes at step %d", self.job.unit, step)
        since_report: list[float] = []
        while step < self.steps:
            self._maybe_inject_failure(step + 1)
            loss = self._step_loss(generator)
            value = float(loss.detach())
            if not math.isfinite(value):
                log.error("unit %s: loss is %s at step %d; stopping at the last checkpoint", self.job.unit, value, step + 1)
                report({"step": step, "nan_at_step": step + 1, "finished": False, "resumed_at": resumed_at,
                        "learning_rate": self.learning_rate}, None)
                return TrainOutcome(steps=step, final_loss=None, nan_at_step=step + 1)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, 1.0)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, 1.0)
                self.optimizer.step()
            step += 1
            losses.append(value)
            since_report.append(value)
            last = step == self.steps
            if step % self.ft.checkpoint_every == 0 or last:
                metrics = {
                    "step": step,
                    "loss": float(np.mean(since_report)),
                    "finished": last,
                    "resumed_at": resumed_at,
                    "learning_rate": self.learning_rate,
                    "target_steps": self.steps,
                    "seconds": time.perf_counter() - start_time,
                    "started_at": started_at,
                    "reported_at": time.time(),
                }
                heldout = self.heldout_loss()
                if heldout is not None:
                    metrics["heldout_loss"] = heldout
                if last:
                    metrics["final_loss"] = self._final_loss(losses)
                report(metrics, self._writer(step, generator, losses, metrics if last else None))
                since_report = []
        return TrainOutcome(steps=step, final_loss=self._final_loss(losses), heldout_loss=self.heldout_loss())

    def _writer(self, step: int, generator: torch.Generator, losses: list[float],
                final_metrics: dict | None) -> Callable[[Path], None]:
        """Writes a checkpoint: the training state to resume from, or, on the last step
        (``final_metrics`` given), the artifact and outcome only."""
        def write(folder: Path) -> None:
            folder = Path(folder)
            if final_metrics is None:
                torch.save(self._state(step, generator, losses), folder / STATE_FILE)
                return
            (folder / ARTIFACT_DIR).mkdir(exist_ok=True)
            self.strategy.save_artifact(self.unet, self.text_encoder, folder / ARTIFACT_DIR, self.ft)
            outcome = {"steps": step, "final_loss": self._final_loss(losses),
                       "heldout_loss": self.heldout_loss(), "learning_rate": self.learning_rate,
                       "metrics": final_metrics}
            (folder / OUTCOME_FILE).write_text(json.dumps(outcome))

        return write

    def _report_finished(self, folder: Path, report) -> TrainOutcome:
        """A trial restarted after its last checkpoint (the job stopped before Tune recorded
        the trial as done): report that checkpoint again instead of training."""
        import shutil

        outcome = json.loads((folder / OUTCOME_FILE).read_text())
        log.info("unit %s had finished; reporting its last checkpoint again", self.job.unit)
        report({**outcome["metrics"], "resumed_at": outcome["steps"]},
               lambda target: shutil.copytree(folder, target, dirs_exist_ok=True))
        return TrainOutcome(steps=outcome["steps"], final_loss=outcome["final_loss"],
                            heldout_loss=outcome["heldout_loss"])

    def _maybe_inject_failure(self, step: int) -> None:
        if self.ft._inject_failure_at_step != step or self.failure_marker is None:
            return
        if self.failure_marker.exists():
            return
        self.failure_marker.parent.mkdir(parents=True, exist_ok=True)
        self.failure_marker.write_text(str(step))
        raise RuntimeError(f"injected failure at step {step} (the finetune test hook)")


# --- prior-preservation class images ---------------------------------------------------------


def draw_class_images(
    model: ModelConfig, generate: GenerateConfig, prompt: str, count: int, seed: int, device: str
) -> np.ndarray:
    """uint8 [count, H, W, 3]: what the base model draws for ``prompt``, seeded, at its native
    side (the side fine-tuning trains its real images at)."""
    from engine.stages.generate.sampler import make_scheduler

    pipe = load_trainable_pipeline(model, device)  # loading and sampling bars are off
    size = native_size(pipe.unet, pipe.vae)
    pipe.scheduler = make_scheduler(generate.scheduler, pipe.scheduler.config)
    images = []
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, count, generate.batch_size):
        n = min(generate.batch_size, count - start)
        out = pipe(
            [prompt] * n, num_inference_steps=generate.steps, guidance_scale=generate.guidance_scale,
            generator=generator, output_type="np", height=size, width=size,
        ).images
        images.append(np.clip(np.round(out * 255), 0, 255).astype(np.uint8))
    return np.concatenate(images)
