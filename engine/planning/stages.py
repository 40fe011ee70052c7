"""What each stage costs, and how long it takes on N devices.

Each stage is a small class, found by name in :data:`STAGE_COSTS`, that turns the config and
the group counts into :class:`StageCost` rows: counted FLOPs (``flops.py``) times the
config's counts, cut into the equal tasks the real stage schedules (fine-tuning trials,
sampler shards, encoder batches, DDP workers), how many of them the config lets run at once,
and the share of a device each task asks Ray for. :func:`schedule` turns a row into time:

- at most ``slots`` tasks run at once (actors, ``max_concurrent_trials``, workers), and no
  more than the devices hold (``share`` devices per task); the rest wait for the next wave;
- tasks that share a device split its throughput: a device does ``peak * MFU`` FLOP/s
  whether one actor or four quarter-GPU actors keep it busy;
- stages, methods and severities run one after another, as ``engine/pipeline.py`` runs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from engine.config import Config
from engine.generation_methods import get_method, is_generation_method
from engine.planning import disk
from engine.planning import flops as F
from engine.planning.counts import GroupCounts, trained_groups
from engine.planning.hardware import Device
from engine.resources import actor_resources, max_concurrent_trials, train_workers, trial_bundle

# The cluster stage estimates silhouettes on a sample this large (engine/stages/cluster/stage.py).
SILHOUETTE_SAMPLE = 4000


@dataclass
class StageCost:
    """One stage of one method (or a shared stage) at one severity."""

    severity: str
    stage: str
    method: str  # "" for a stage every method shares (cluster)
    flops: float
    tasks: int  # equal pieces of work the stage schedules
    slots: int  # how many of them the config lets run at once
    share: float  # devices one task asks for (a fraction of a GPU, or of a machine's CPUs)
    part: str = ""  # a named piece of a stage (prior-preservation class images)
    slots_key: str = ""  # the config key that sets slots, named when it leaves devices idle
    notes: list[str] = field(default_factory=list)
    # Disk (engine/planning/disk.py): bytes the row leaves in the run directory, and bytes one
    # running task holds besides while it runs (fine-tuning checkpoints in flight).
    disk_bytes: float = 0.0
    task_scratch_bytes: float = 0.0
    # Filled in by schedule():
    mfu: float = 0.0
    mfu_source: str = ""
    concurrent: int = 0
    devices: float = 0.0
    waves: int = 0
    device_seconds: float = 0.0
    wall_seconds: float = 0.0
    scratch_bytes: float = 0.0  # task_scratch_bytes times the tasks running at once

    @property
    def label(self) -> str:
        return " ".join(x for x in (self.stage, self.method, f"({self.part})" if self.part else "") if x)


def schedule(cost: StageCost, device: Device, n_devices: int) -> StageCost:
    """Fill in the row's time on ``n_devices`` units of ``device`` (GPUs, or CPU cores)."""
    cost.mfu = device.mfu[cost.stage]
    cost.mfu_source = device.mfu_source[cost.stage]
    rate = device.rate(cost.stage)
    cost.device_seconds = cost.flops / rate
    if cost.flops <= 0 or cost.tasks <= 0:
        return cost
    share = cost.share
    if share > n_devices:
        cost.notes.append(
            f"{cost.label}: a task asks for {share:g} devices but the cluster has {n_devices}; "
            "Ray would wait forever, planned as if each task used all of them"
        )
        share = float(n_devices)
    fit = max(1, math.floor(n_devices / share + 1e-9))
    cost.concurrent = max(1, min(cost.slots, cost.tasks, fit))
    if device.is_gpu:
        # Fractional GPUs pack onto whole ones; a lone quarter-GPU actor still has the GPU.
        held = math.ceil(cost.concurrent * share - 1e-9) if share < 1 else cost.concurrent * share
    else:
        # A CPU task runs one thread per whole CPU it asks for, and at least one.
        held = cost.concurrent * max(1, math.floor(share + 1e-9))
    cost.devices = min(float(n_devices), held)
    cost.waves = math.ceil(cost.tasks / cost.concurrent)
    cost.scratch_bytes = cost.concurrent * cost.task_scratch_bytes
    if cost.slots_key and cost.slots < min(cost.tasks, fit) and cost.devices < n_devices:
        unit = "GPUs" if device.is_gpu else "cores"
        cost.notes.append(
            f"{cost.label}: {n_devices - math.ceil(cost.devices - 1e-9)} of {n_devices} {unit} idle; "
            f"{cost.slots_key}={cost.slots} caps it ('auto' uses them)"
        )
    per_task_seconds = (cost.flops / cost.tasks) / (rate * cost.devices / cost.concurrent)
    cost.wall_seconds = cost.waves * per_task_seconds
    return cost


@dataclass
class PlanContext:
    cfg: Config
    severity: str
    counts: GroupCounts
    device: Device
    n_devices: int
    shapes: F.DiffusionShapes
    encoder: F.EncoderShapes
    clusters: list[int]
    notes: list[str] = field(default_factory=list)

    def share(self, what: str, gpus: float, cpus: float) -> float:
        """What a task of ``what`` asks Ray for: its GPUs on a GPU plan, its CPUs (cores)
        on a CPU plan."""
        if not self.device.is_gpu:
            return max(cpus, 1e-6)
        if gpus > 0:
            return gpus
        self.notes.append(f"{what} asks for no GPU; planned with one GPU per task (set it for GPU runs)")
        return 1.0

    def reachable(self) -> dict[str, float]:
        """The planned cluster as the stages' resolution sees it (engine/resources.py): N GPUs
        (CPUs then never the bound), or N cores."""
        if self.device.is_gpu:
            return {"GPU": float(self.n_devices), "CPU": math.inf}
        return {"CPU": float(self.n_devices)}

    @property
    def run_cfg(self) -> Config:
        """The config as it runs on the planned devices: a CPU plan is a model.device=cpu run
        (every GPU share off), as a GPU preset needs on a machine without GPUs."""
        if self.device.is_gpu:
            return self.cfg
        cpu = self.cfg.model_copy(deep=True)
        cpu.model.device = "cpu"
        return cpu

    def actor_slots(self, stage: str, tasks: int) -> int:
        """How many of a Ray Data stage's actors run at once, resolved as the stage does."""
        return actor_resources(self.run_cfg, stage, tasks, reachable=self.reachable(), check_gpu=False).max_actors

    def generative_methods(self) -> list[str]:
        return [m for m in self.cfg.methods if is_generation_method(m)]

    def sample_flops(self, latent: int) -> float:
        """One image drawn with the configured sampler at ``latent`` x ``latent`` cells:
        ``steps`` UNet calls (two with guidance) and one VAE decode. Prompts repeat, and the
        sampler encodes each distinct one once, so text encoding is left out."""
        gen = self.cfg.generate
        calls = 2 if gen.guidance_scale > 1.0 else 1
        return gen.steps * calls * F.unet_forward(self.shapes, latent) + F.vae_decode(self.shapes, latent)


class StageCostModel:
    """How one stage turns the config and counts into cost rows."""

    name: ClassVar[str] = ""

    def costs(self, ctx: PlanContext) -> list[StageCost]:
        raise NotImplementedError


class ClusterCost(StageCostModel):
    """Embed every training image once, then k-means (FAISS, on CPU) per group."""

    name = "cluster"

    def costs(self, ctx):
        if not ctx.generative_methods():
            return []
        cfg, cl = ctx.cfg, ctx.cfg.cluster
        n = ctx.counts.n_train
        embed = n * F.image_encoder_forward(ctx.encoder)
        d = ctx.encoder.dim
        kmeans = 0.0
        for n_g, k_g in zip(ctx.counts.train, ctx.clusters, strict=True):
            candidates = range(2, k_g + 1) if cl.k == "auto" else [k_g]
            for k in candidates:
                kmeans += cl.nredo * cl.niter * 2.0 * n_g * k * d + 2.0 * min(n_g, SILHOUETTE_SAMPLE) ** 2 * d
        share = ctx.share("cluster.actor_num_gpus", cl.actor_num_gpus, cl.actor_num_cpus)
        return [
            StageCost(ctx.severity, "cluster", "", embed + kmeans, math.ceil(n / cl.batch_size),
                      ctx.actor_slots("cluster", math.ceil(n / cl.batch_size)), share,
                      slots_key="cluster.num_actors", notes=[f"cluster: k-means counted as 2*n*k*d per iteration ({cfg.cluster.nredo} restarts)"]),
        ]


class FinetuneCost(StageCostModel):
    """One Ray Tune trial per trained unit (num_samples per unit when searching), at most
    max_concurrent_trials at once; DreamBooth first draws its prior-preservation images."""

    name = "finetune"

    def costs(self, ctx):
        cfg, ft = ctx.cfg, ctx.cfg.finetune
        rows = []
        prior_paid = False
        # Fine-tuning runs at the generator's native resolution, whatever data.image_size is.
        latent = ctx.shapes.native_size // ctx.shapes.vae_scale
        bundle = trial_bundle(ft, ctx.run_cfg.model.device)
        share = ctx.share("finetune.trial_resources", bundle.get("GPU", 0.0), bundle["CPU"])
        # The trainer checkpoints gradients on GPUs only (engine/stages/finetune/trainer.py).
        checkpointing = ft.gradient_checkpointing and ctx.device.is_gpu
        for method in ctx.generative_methods():
            generation = get_method(method)
            if not generation.trains:
                rows.append(StageCost(ctx.severity, "finetune", method, 0.0, 0, 1, share,
                                      notes=[f"finetune {method}: trains nothing"]))
                continue
            lora_rank = ft.lora_rank if generation.trains_lora(ft) else None
            prior = generation.uses_prior(ft)
            calls = generation.unet_calls_per_step(ft)
            groups = trained_groups(cfg, ctx.counts)
            units = generation.planned_unit_images(ctx.counts.train, ctx.clusters, groups)
            step = ft.batch_size * F.unet_train_step(ctx.shapes, latent, lora_rank, checkpointing) * calls
            if generation.trains_text_encoder(ft):
                step += calls * F.text_encoder_forward(ctx.shapes, train=True)
            encode = F.vae_encode(ctx.shapes, ctx.shapes.native_size)
            total = sum(
                ft.steps * step + (n_real + (ft.num_class_images if prior else 0)) * encode
                + 2 * F.text_encoder_forward(ctx.shapes)
                for n_real in units
            ) * ft.num_samples
            trials = len(units) * ft.num_samples
            row = StageCost(ctx.severity, "finetune", method, total, trials,
                            max_concurrent_trials(ft) or max(1, trials), share,
                            slots_key="finetune.max_concurrent_trials")
            _finetune_disk(ctx, method, row, len(units))
            if ft.num_samples > 1:
                row.notes.append(f"finetune {method}: ASHA stops lagging trials early; full trials counted (an upper bound)")
            borrowed = ctx.counts.n_groups - len(groups)
            if borrowed:
                row.notes.append(f"finetune {method}: {borrowed} group(s) under finetune.min_real_images borrow a model")
            if prior and not prior_paid and groups:
                # Class images are cached by prompt in the run, so the first DreamBooth method
                # draws them and the next reuses them (engine/stages/finetune/stage.py).
                prior_paid = True
                images = len(groups) * ft.num_class_images
                rows.append(StageCost(ctx.severity, "finetune", method, images * ctx.sample_flops(latent), len(groups),
                                      len(groups), share, part="class images",
                                      disk_bytes=len(groups) * disk.class_image_bytes(ctx.shapes.native_size,
                                                                                      ft.num_class_images)))
            rows.append(row)
        return rows


def _finetune_disk(ctx: PlanContext, method: str, row: StageCost, units: int) -> None:
    """What a method's trained units keep, and what a running trial's checkpoints hold."""
    ft = ctx.cfg.finetune
    per_unit = disk.unit_artifact_bytes(ctx.shapes, ft, method)
    row.disk_bytes = units * per_unit
    # A resumable checkpoint is written every checkpoint_every steps before the last; the
    # last step's holds only the artifact.
    resumable = ft.steps > ft.checkpoint_every
    per_checkpoint = disk.checkpoint_bytes(ctx.shapes, ft, method, ctx.device.is_gpu) if resumable else per_unit
    row.task_scratch_bytes = disk.CHECKPOINT_COPIES * per_checkpoint
    store = get_method(method).artifact(ft).describe(ft)
    row.notes.append(f"finetune {method}: {units} unit(s) x {per_unit / 1e6:,.1f} MB ({store}); a resumable "
                     f"checkpoint is {per_checkpoint / 1e9:.3g} GB")


class GenerateCost(StageCostModel):
    """images_per_group per group, cut into shards that the sampler actors take in turn."""

    name = "generate"

    def costs(self, ctx):
        from engine.stages.generate.plan import images_per_group

        gen = ctx.cfg.generate
        per_group = images_per_group(gen, ctx.counts.train)
        total = per_group * ctx.counts.n_groups
        latent = ctx.shapes.native_size // ctx.shapes.vae_scale
        share = ctx.share("generate.actor_num_gpus", gen.actor_num_gpus, gen.actor_num_cpus)
        return [
            StageCost(ctx.severity, "generate", method, total * ctx.sample_flops(latent),
                      math.ceil(total / gen.rows_per_shard),
                      ctx.actor_slots("generate", math.ceil(total / gen.rows_per_shard)), share,
                      slots_key="generate.num_actors", disk_bytes=total * disk.png_bytes(ctx.shapes.native_size))
            for method in ctx.generative_methods()
        ]


class FilterCost(StageCostModel):
    """Every synthetic image through the encoder's image tower, in encoder batches."""

    name = "filter"

    def costs(self, ctx):
        from engine.stages.generate.plan import images_per_group

        flt = ctx.cfg.filter
        total = images_per_group(ctx.cfg.generate, ctx.counts.train) * ctx.counts.n_groups
        share = ctx.share("filter.actor_num_gpus", flt.actor_num_gpus, flt.actor_num_cpus)
        return [
            StageCost(ctx.severity, "filter", method, total * F.image_encoder_forward(ctx.encoder),
                      math.ceil(total / flt.batch_size),
                      ctx.actor_slots("filter", math.ceil(total / flt.batch_size)), share,
                      slots_key="filter.num_actors")
            for method in ctx.generative_methods()
        ]


class TrainCost(StageCostModel):
    """The method's phases (engine/stages/train/methods.py), data-parallel over train.num_workers,
    validation on every scored epoch and a final val + test pass."""

    name = "train"

    def costs(self, ctx):
        from engine.stages.filter.stage import keep_count
        from engine.stages.generate.plan import images_per_group
        from engine.stages.train.methods import SYNTHETIC, get_method

        cfg, tr = ctx.cfg, ctx.cfg.train
        n_classes = ctx.counts.n_classes
        per_group = images_per_group(cfg.generate, ctx.counts.train)
        synthetic = ctx.counts.n_groups * keep_count(per_group, cfg.filter.keep_fraction)
        share = ctx.share("train.use_gpu", 1.0 if tr.use_gpu else 0.0, tr.cpus_per_worker)
        forward = F.classifier_step(tr.backbone, n_classes, tr.image_size, "eval")
        workers = train_workers(ctx.run_cfg, ctx.reachable(), check_gpu=False)
        rows = []
        for method in cfg.methods:
            phases = get_method(method).phases(tr)
            total = 0.0
            for phase in phases:
                n = synthetic if phase.dataset == SYNTHETIC else ctx.counts.n_train
                mode = "head" if phase.trainable == "head" else "train"
                total += phase.epochs * n * F.classifier_step(tr.backbone, n_classes, tr.image_size, mode)
            total += (phases[-1].epochs + 1) * ctx.counts.val * forward + ctx.counts.test * forward
            row = StageCost(ctx.severity, "train", method, total, workers, workers, share)
            if ctx.device.is_gpu and tr.use_gpu and workers > ctx.n_devices:
                row.notes.append(
                    f"train {method}: train.num_workers={workers} needs that many GPUs at once; "
                    "Ray Train waits for them"
                )
            elif tr.num_workers != "auto" and ctx.device.is_gpu and tr.use_gpu and workers < ctx.n_devices:
                row.notes.append(
                    f"train {method}: {ctx.n_devices - workers} of {ctx.n_devices} GPUs idle; "
                    f"train.num_workers={workers} caps it ('auto' uses them)"
                )
            rows.append(row)
        return rows


STAGE_COSTS: dict[str, StageCostModel] = {
    model.name: model for model in (ClusterCost(), FinetuneCost(), GenerateCost(), FilterCost(), TrainCost())
}
