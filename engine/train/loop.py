"""The Ray Train loop: DDP workers run a method's phases over their Ray Data shards,
checkpoint every epoch, and finally evaluate the best checkpoint on val and test.

Each worker reads its shard of the phase's dataset (``train`` or ``synthetic``) through
``get_dataset_shard``, so data arrives decoded and augmented by Ray Data. After every epoch
rank 0 saves the model, optimizer and loss state and every worker reports; a restarted
worker group (``FailureConfig``) resumes from the latest checkpoint. Epochs of the last
phase are scored by validation worst-group accuracy, and once training ends the workers
load the best-scoring checkpoint and evaluate it on the whole val and test splits (decoded
once, read from the object store; each worker scores its share, gathered across workers). The loop does not know which method it runs:
phases, losses and trainable parameters come from ``engine.train.methods``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine import storage
from engine.metrics import summarize
from engine.train.backbones import Classifier, build_classifier
from engine.train.methods import Phase, get_method

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
SCORE = "val_worst_group"
# Reported for epochs that are not candidates (stage-1 pretraining): below any accuracy.
NOT_SCORED = -1.0


def to_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NHWC batch -> float NCHW in [0, 1] on the device (normalised by the model)."""
    images = images.to(device, non_blocking=True)
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def seed_torch(seed: int, deterministic: bool) -> None:
    """Seed model initialisation; with ``deterministic``, also pick kernels that give the same
    numbers every run (cuDNN's and cuBLAS's included). On CPU the usual kernels already are;
    on GPUs this costs some speed, so ``train.deterministic=false`` turns it off."""
    torch.manual_seed(seed)
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def set_trainable(model: Classifier, trainable: str) -> None:
    freeze_encoder = trainable == "head"
    for p in model.encoder.parameters():
        p.requires_grad_(not freeze_encoder)
    for p in model.head.parameters():
        p.requires_grad_(True)


def set_mode(model: Classifier, trainable: str) -> None:
    """Train mode, except a frozen encoder, whose BatchNorm statistics stay frozen too."""
    model.train()
    if trainable == "head":
        model.encoder.eval()


def build_optimizer(model: Classifier, phase: Phase, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=phase.learning_rate, weight_decay=weight_decay)


def _autocast(device: torch.device):
    # bf16 autocast on GPUs: ResNet-50 at 224 px is compute-bound; CPU runs stay fp32.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train_epoch(model, module: Classifier, batches, phase: Phase, sample_loss, aggregate, optimizer, device) -> dict:
    """One pass over a shard; returns the mean loss and the number of images seen."""
    set_mode(module, phase.trainable)
    total, seen, steps = 0.0, 0, 0
    for batch in batches:
        images = to_input(batch["image"], device)
        labels = batch["label"].to(device)
        groups = batch["group"].to(device)
        with _autocast(device):
            logits, features = model(images)
        losses = sample_loss(logits.float(), features.float(), labels)
        loss = aggregate(losses, groups)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        seen += len(labels)
        steps += 1
    return {"train_loss": total / max(steps, 1), "images": seen}


def epoch_batches(shard, cfg, per_worker_batch: int, epoch: int, rank: int):
    """One epoch of a worker's training shard, as torch batches."""
    return shard.iter_torch_batches(
        batch_size=per_worker_batch,
        drop_last=True,  # equal batch counts on every worker, and no BatchNorm batch of one
        local_shuffle_buffer_size=max(cfg.shuffle_buffer_rows, per_worker_batch),
        local_shuffle_seed=cfg.seed + 1000 * epoch + rank,
    )


def load_eval_split(refs: list) -> dict[str, np.ndarray]:
    """A split from ``engine.train.data.eval_split_refs``: image, label and group arrays."""
    import ray

    blocks = [b for b in ray.get(list(refs)) if len(b["label"])]
    return {k: np.concatenate([b[k] for b in blocks]) for k in ("image", "label", "group")}


@torch.no_grad()
def predict(module: Classifier, images: np.ndarray, batch_size: int, device) -> np.ndarray:
    module.eval()
    preds = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        with _autocast(device):
            logits, _ = module(to_input(batch, device))
        preds.append(logits.argmax(1).cpu().numpy())
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def gather(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Concatenate every worker's arrays (a no-op on one worker)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return arrays
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, arrays)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(arrays)))


def evaluate(module: Classifier, split: dict, batch_size: int, n_groups: int, device, rank: int, world: int,
             train_group_counts=None) -> dict:
    """Metrics of a whole split: each worker scores every world-th image, then they gather."""
    mine = slice(rank, None, world)
    preds = predict(module, split["image"][mine], batch_size, device)
    preds, labels, groups = gather((preds, split["label"][mine], split["group"][mine]))
    result = summarize(preds, labels, groups, n_groups, train_group_counts)
    return {k: ([float(x) for x in v] if isinstance(v, list) else float(v)) for k, v in result.items()}


def _schedule(phases: list[Phase]) -> list[tuple[int, int]]:
    """(phase index, epoch within the phase) for every epoch of the run."""
    return [(i, e) for i, phase in enumerate(phases) for e in range(phase.epochs)]


def _save_checkpoint(state: dict):
    import ray.train

    directory = tempfile.mkdtemp(prefix="fairsynth-ckpt-")
    torch.save(state, os.path.join(directory, STATE_FILE))
    return ray.train.Checkpoint.from_directory(directory), directory


def _load_state(checkpoint) -> dict:
    with checkpoint.as_directory() as directory:
        return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False)


def _best_reported(min_epoch: int):
    """The reported checkpoint with the best validation worst-group accuracy (ties: the
    better average-group accuracy, then the later epoch), among epochs >= min_epoch."""
    import ray.train

    candidates = [
        c for c in ray.train.get_all_reported_checkpoints() if c.metrics.get("epoch", -1) >= min_epoch
    ]
    if not candidates:
        return None
    return max(
        candidates,
        key=lambda c: (c.metrics[SCORE], c.metrics.get("val_average_group", 0.0), c.metrics["epoch"]),
    )


def _tensorboard(directory: str | None, rank: int):
    if rank != 0 or not directory:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter

        # SummaryWriter writes local files: for a run directory on object storage it writes to
        # a local folder that _sync_tensorboard uploads after every epoch.
        return SummaryWriter(tempfile.mkdtemp(prefix="fairsynth-tb-") if storage.is_remote(directory) else directory)
    except Exception as exc:  # TensorBoard is a convenience; training goes on without it.
        log.warning("no TensorBoard logs (%s: %s)", exc.__class__.__name__, exc)
        return None


def _sync_tensorboard(writer, directory: str | None) -> None:
    if writer is not None and directory and storage.is_remote(directory):
        try:
            storage.upload_folder(writer.log_dir, directory, replace=False)
        except OSError as exc:  # a convenience, like the logs themselves
            log.warning("TensorBoard logs not uploaded to %s (%s)", directory, exc)


def train_loop(config: dict) -> dict:
    """Ray Train worker entry point; ``config`` is built by ``engine.train.stage``."""
    import ray.train
    import ray.train.torch

    # A 1x1 convolution's gradient has other (equivalent) strides on its size-1 axes than
    # DDP's bucket view; DDP copies it, correctly, and warns on every run.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

    cfg = config["train"]
    method = get_method(config["method"])
    phases = method.phases(cfg)
    schedule = _schedule(phases)
    n_groups, n_classes = config["n_groups"], config["n_classes"]
    train_counts = config["train_group_counts"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    per_worker_batch = max(2, cfg.batch_size // world)
    eval_batch = per_worker_batch * 4
    val_split = load_eval_split(config["eval_refs"]["val"])
    # The selection phase is the last one; its first epoch is the first candidate.
    first_scored_epoch = len(schedule) - phases[-1].epochs

    seed_torch(cfg.seed, cfg.deterministic)
    module = build_classifier(cfg.backbone, n_classes, cfg.pretrained_weights).to(device)
    start_epoch, history = 0, []
    optimizer_state, aggregate_state, resumed_phase = None, None, None
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        state = _load_state(resumed)
        module.load_state_dict(state["model"])
        start_epoch, history = state["epoch"], state["history"]
        optimizer_state, aggregate_state = state["optimizer"], state["aggregate"]
        resumed_phase = state["phase"]
        log.info("rank %d resumes after epoch %d", rank, start_epoch)

    writer = _tensorboard(config.get("tensorboard_dir"), rank)
    current_phase, model, optimizer, sample_loss, aggregate = None, None, None, None, None
    for epoch in range(start_epoch, len(schedule)):
        phase_index, _ = schedule[epoch]
        phase = phases[phase_index]
        if phase_index != current_phase:
            set_trainable(module, phase.trainable)
            model = None  # drop the previous DDP wrapper (and its hooks) first
            model = ray.train.torch.prepare_model(module, move_to_device=False) if world > 1 else module
            optimizer = build_optimizer(module, phase, cfg.weight_decay)
            sample_loss = phase.build_sample_loss(cfg)
            aggregate = phase.build_aggregate(cfg, n_groups, train_counts)
            # Optimizer and loss state carry over only within the phase that saved them.
            if epoch == start_epoch and resumed_phase == phase_index:
                optimizer.load_state_dict(optimizer_state)
                aggregate.load_state_dict(aggregate_state)
            current_phase = phase_index

        started = time.perf_counter()
        batches = epoch_batches(ray.train.get_dataset_shard(phase.dataset), cfg, per_worker_batch, epoch, rank)
        stats = train_epoch(model, module, batches, phase, sample_loss, aggregate, optimizer, device)
        seconds = time.perf_counter() - started
        metrics = {
            "epoch": epoch,
            "phase": phase.name,
            "objective": phase.objective(cfg),  # what train_loss measures, and what trains
            "train_loss": stats["train_loss"],
            "epoch_seconds": seconds,
            "images_per_second": stats["images"] * world / max(seconds, 1e-9),
            SCORE: NOT_SCORED,
            "val_average_group": NOT_SCORED,
            **aggregate.stats(),
        }
        if epoch >= first_scored_epoch:
            val = evaluate(module, val_split, eval_batch, n_groups, device, rank, world)
            metrics.update({SCORE: val["worst_group"], "val_average_group": val["average_group"], "val_accuracy": val["accuracy"]})
        history.append(metrics)
        if writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    writer.add_scalar(f"{phase.name}/{key}", value, epoch)
            writer.flush()
            _sync_tensorboard(writer, config.get("tensorboard_dir"))

        checkpoint, directory = None, None
        if rank == 0:
            checkpoint, directory = _save_checkpoint(
                {
                    "model": module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "aggregate": aggregate.state_dict(),
                    "epoch": epoch + 1,
                    "phase": phase_index,
                    "history": history,
                }
            )
        ray.train.report(metrics, checkpoint=checkpoint)
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        _maybe_inject_failure(cfg, epoch, start_epoch, rank, world, config.get("failure_marker"))

    best = _best_reported(first_scored_epoch)
    state = _load_state(best.checkpoint) if best is not None else {"model": module.state_dict(), "epoch": len(schedule)}
    module.load_state_dict(state["model"])
    val = evaluate(module, val_split, eval_batch, n_groups, device, rank, world, train_counts)
    test = evaluate(module, load_eval_split(config["eval_refs"]["test"]), eval_batch, n_groups, device, rank, world, train_counts)
    if writer is not None:
        writer.add_scalar("final/test_worst_group", test["worst_group"], state["epoch"] - 1)
        writer.add_scalar("final/test_average_group", test["average_group"], state["epoch"] - 1)
        writer.close()
        _sync_tensorboard(writer, config.get("tensorboard_dir"))
        if storage.is_remote(config.get("tensorboard_dir") or ""):
            shutil.rmtree(writer.log_dir, ignore_errors=True)  # the local copy, uploaded
    # Rank 0's return value is the Result's return_value.
    return {"best_epoch": state["epoch"] - 1, "val": val, "test": test, "history": history}


def _maybe_inject_failure(cfg, epoch: int, start_epoch: int, rank: int, world: int, marker: str | None) -> None:
    """Test hook (``train.inject_failure_at_epoch``): the last worker's process dies once,
    right after the epoch's checkpoint is registered, as a lost node would take it."""
    if cfg.inject_failure_at_epoch is None or epoch + 1 != cfg.inject_failure_at_epoch:
        return
    if start_epoch > epoch or rank != world - 1:
        return
    if marker:
        if Path(marker).exists():
            return
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).write_text(f"worker {rank} lost after epoch {epoch + 1}\n")
    import ray.train

    ray.train.get_all_reported_checkpoints()  # the checkpoint is registered before dying
    log.warning("injected failure: worker %d exits after epoch %d", rank, epoch + 1)
    os._exit(1)
