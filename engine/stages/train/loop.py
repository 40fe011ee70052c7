"""The Ray Train loop: DDP workers run each method's phases over their Ray Data shards,
checkpoint every epoch, and evaluate each method's best epoch on val and test.

One fit trains every method it is given, one after another, so the worker group, its
process group and the data coordinators start once a run rather than once a method. Each
method starts from the seed as a fit of its own would (the same initial weights, its own
datasets with their own epoch counters), so its metrics do not depend on which methods
share the fit. Each worker reads its shard of the phase's dataset (``train`` or
``synthetic``, under the method's name) through ``get_dataset_shard``, so data arrives
decoded and augmented by Ray Data. After every epoch rank 0 saves the model, optimizer and
loss state, the best-scoring epoch's weights so far, and the finished methods' results; a
restarted worker group (``FailureConfig``) resumes from the latest checkpoint. Epochs of
the last phase are scored by validation worst-group accuracy, and once a method's epochs
end the workers load its best weights and evaluate them on the whole val and test splits.

Evaluation streams: val and test are decoded once into the object store as blocks of about
``engine.stages.train.data.BLOCK_BYTES``; each worker fetches its share of the blocks one at a time,
counts right answers per group, and the workers sum their counts (``all_reduce``). No worker
holds a whole split, and integer counts make the metrics exact and independent of which
worker scored what. The loop never branches on the method it runs (it only names it in
checkpoints): phases, losses and trainable parameters come from ``engine.stages.train.methods``.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine import storage
from engine.config import TrainConfig
from engine.errors import FairsynthError
from engine.metrics import summarize
from engine.stages.train.backbones import Classifier, build_classifier
from engine.stages.train.methods import SYNTHETIC, Phase, get_method

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
# What a checkpoint's state holds besides the model and optimizer (see _report_epoch).
CHECKPOINT_FIELDS = {"method", "model", "epoch", "phase", "history", "best", "finished"}
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


def worker_blocks(refs: list, rank: int, world: int) -> list:
    """A worker's share of a split's blocks (``engine.stages.train.data.eval_split_refs``): every
    world-th block, from its rank on."""
    return list(refs)[rank::world]


@torch.no_grad()
def count_correct(module: Classifier, blocks: list, batch_size: int, n_groups: int, device) -> np.ndarray:
    """[correct, total] per group over the blocks, fetched one at a time, so a worker holds
    one block of the split at most."""
    import ray

    module.eval()
    counts = np.zeros((2, n_groups), np.int64)
    for ref in blocks:
        block = ray.get(ref)
        for start in range(0, len(block["label"]), batch_size):
            end = start + batch_size
            # A copy of one batch: the block is read-only shared memory, which torch will not wrap.
            images = torch.from_numpy(np.array(block["image"][start:end]))
            with _autocast(device):
                logits, _ = module(to_input(images, device))
            right = logits.argmax(1).cpu().numpy() == block["label"][start:end]
            groups = block["group"][start:end]
            counts[0] += np.bincount(groups[right], minlength=n_groups)
            counts[1] += np.bincount(groups, minlength=n_groups)
        del block  # unmapped before the next block is fetched
    return counts


def all_reduce_sum(counts: np.ndarray, device) -> np.ndarray:
    """Element-wise sum over the workers (a no-op on one worker)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return counts
    total = torch.from_numpy(counts).to(device)  # NCCL reduces only GPU tensors
    dist.all_reduce(total)
    return total.cpu().numpy()


def summarize_counts(counts: np.ndarray, n_groups: int, train_group_counts=None) -> dict:
    """``engine.metrics.summarize`` of a split known by its per-group [correct, total] counts.
    summarize reads only whether each image was right and its group, so one outcome per image,
    in any order, gives the figures the predictions themselves give, bit for bit."""
    correct, total = counts
    groups = np.repeat(np.arange(n_groups), total)
    right = np.concatenate([np.arange(t) < c for c, t in zip(correct, total, strict=True)])
    return summarize(right, np.ones_like(right), groups, n_groups, train_group_counts)


def evaluate(module: Classifier, blocks: list, batch_size: int, n_groups: int, device, train_group_counts=None) -> dict:
    """Metrics of a whole split: each worker scores its blocks, and the counts are summed."""
    counts = all_reduce_sum(count_correct(module, blocks, batch_size, n_groups, device), device)
    result = summarize_counts(counts, n_groups, train_group_counts)
    return {k: ([float(x) for x in v] if isinstance(v, list) else float(v)) for k, v in result.items()}


def _schedule(phases: list[Phase]) -> list[tuple[int, int]]:
    """(phase index, epoch within the phase) for every epoch of the run."""
    return [(i, e) for i, phase in enumerate(phases) for e in range(phase.epochs)]


def _save_checkpoint(state: dict):
    import ray.train

    directory = tempfile.mkdtemp(prefix="fairsynth-ckpt-")
    torch.save(state, os.path.join(directory, STATE_FILE))
    return ray.train.Checkpoint.from_directory(directory), directory


def read_checkpoint_state(data: bytes, where: str) -> dict:
    """A checkpoint's state, loaded with ``weights_only``: tensors and plain Python values only,
    so a pickle planted in the run directory cannot run code when a run resumes."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        # torch's message is a page long; its WeightsUnpickler line says what was refused.
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?:\. |\n|$)", str(exc))
        reason = found.group(1) if found else type(exc).__name__
        raise FairsynthError(
            f"{where} is not a checkpoint this version wrote ({reason}); it is not loaded: "
            "delete its experiment folder and re-run the train stage"
        ) from None


def _load_state(checkpoint) -> dict:
    with checkpoint.as_directory() as directory:
        path = os.path.join(directory, STATE_FILE)
        with open(path, "rb") as f:
            return read_checkpoint_state(f.read(), path)


def _selection_key(metrics: dict) -> tuple:
    """How epochs are ranked: validation worst-group accuracy, then average-group accuracy,
    then the later epoch."""
    return (metrics[SCORE], metrics.get("val_average_group", 0.0), metrics["epoch"])


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _keep_if_best(best: dict | None, module: Classifier, metrics: dict, first_scored_epoch: int) -> dict | None:
    """The best-scoring epoch so far and a copy of its weights. It is kept in memory and in
    every checkpoint, not picked from Ray Train's checkpoints, because one fit reports the
    epochs of several methods and its checkpoint ranking cannot tell them apart."""
    if metrics["epoch"] < first_scored_epoch:
        return best
    key = _selection_key(metrics)
    if best is not None and tuple(best["key"]) >= key:
        return best
    return {"key": list(key), "epoch": metrics["epoch"] + 1, "model": _cpu_copy(module.state_dict())}


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


@dataclass
class WorkerRun:
    """What one worker knows about the method it trains: the config and phases, the datasets
    they read, and its place in the group."""

    cfg: TrainConfig
    method: str
    phases: list[Phase]
    n_groups: int
    n_classes: int
    train_counts: list[int]
    eval_blocks: dict[str, list]  # this worker's share of the val and test blocks
    rank: int
    world: int
    device: torch.device
    # The fit's name for each view a phase reads (``Phase.view``): one fit holds the views
    # of several methods.
    datasets: dict[str, str] = field(default_factory=dict)
    tensorboard_dir: str | None = None
    failure_marker: str | None = None

    # Computed once: every epoch asks for them, and the phases never change within a method.
    @cached_property
    def schedule(self) -> list[tuple[int, int]]:
        return _schedule(self.phases)

    @cached_property
    def first_scored_epoch(self) -> int:
        # The selection phase is the last one; its first epoch is the first candidate.
        return len(self.schedule) - self.phases[-1].epochs

    def ends_pretraining(self, epoch: int) -> bool:
        """Whether ``epoch`` is the last of a synthetic phase that a real-data phase follows."""
        index, within = self.schedule[epoch]
        phase = self.phases[index]
        return phase.dataset == SYNTHETIC and within == phase.epochs - 1 and index < len(self.phases) - 1

    @property
    def per_worker_batch(self) -> int:
        return max(2, self.cfg.batch_size // self.world)

    def evaluate(self, module: Classifier, split: str, train_counts=None) -> dict:
        blocks = self.eval_blocks[split]
        return evaluate(module, blocks, self.per_worker_batch * 4, self.n_groups, self.device, train_counts)

    def dataset_name(self, phase: Phase) -> str:
        return self.datasets.get(phase.view, phase.view)

    @classmethod
    def from_config(cls, config: dict, job: dict) -> WorkerRun:
        """The loop's config (built by ``engine.stages.train.stage``) as this worker sees it, for one
        of its methods (``job``: the method, its dataset names and TensorBoard folder)."""
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        cfg = config["train"].for_method(job["method"])
        return cls(
            cfg=cfg,
            method=job["method"],
            phases=get_method(job["method"]).phases(cfg),
            datasets=job.get("datasets", {}),
            n_groups=config["n_groups"],
            n_classes=config["n_classes"],
            train_counts=config["train_group_counts"],
            eval_blocks={split: worker_blocks(refs, rank, world) for split, refs in config["eval_refs"].items()},
            rank=rank,
            world=world,
            device=ray.train.torch.get_device(),
            tensorboard_dir=job.get("tensorboard_dir"),
            failure_marker=config.get("failure_marker"),
        )


@dataclass
class PhaseRun:
    """What one phase trains with; the next phase builds its own."""

    index: int
    phase: Phase
    model: torch.nn.Module  # the DDP wrapper on several workers, else the module itself
    optimizer: torch.optim.Optimizer
    sample_loss: object
    aggregate: object


def start_phase(module: Classifier, phase: Phase, index: int, cfg: TrainConfig, n_groups: int, train_counts,
                distributed: bool) -> PhaseRun:
    """Freeze what the phase does not train, wrap the module for DDP (``distributed``), and
    build the phase's optimizer and losses."""
    set_trainable(module, phase.trainable)
    model = module
    if distributed:
        import ray.train.torch

        model = ray.train.torch.prepare_model(module, move_to_device=False)
    return PhaseRun(
        index=index,
        phase=phase,
        model=model,
        optimizer=build_optimizer(module, phase, cfg.weight_decay),
        sample_loss=phase.build_sample_loss(cfg),
        aggregate=phase.build_aggregate(cfg, n_groups, train_counts),
    )


def _latest_state(rank: int) -> dict | None:
    """The state in Ray Train's latest checkpoint (a restarted worker group's, or a re-run's
    of the same experiment), or None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    try:
        state = _load_state(checkpoint)
    except Exception as exc:  # cut short or overwritten: nothing of it is trained on
        log.warning("rank %d: the latest checkpoint %s is damaged (%s); training from the start",
                    rank, os.path.join(checkpoint.path, STATE_FILE), type(exc).__name__)
        return None
    log.info("rank %d resumes %s after epoch %d", rank, state["method"], state["epoch"])
    return state


def _run_epoch(run: WorkerRun, module: Classifier, current: PhaseRun, epoch: int) -> dict:
    """Train one epoch of the current phase; validate it if it is a candidate. Its metrics."""
    import ray.train

    phase, cfg = current.phase, run.cfg
    started = time.perf_counter()
    shard = ray.train.get_dataset_shard(run.dataset_name(phase))
    batches = epoch_batches(shard, cfg, run.per_worker_batch, epoch, run.rank)
    stats = train_epoch(current.model, module, batches, phase, current.sample_loss, current.aggregate,
                        current.optimizer, run.device)
    seconds = time.perf_counter() - started
    metrics = {
        "epoch": epoch,
        "phase": phase.name,
        "objective": phase.objective(cfg),  # what train_loss measures, and what trains
        "train_loss": stats["train_loss"],
        "epoch_seconds": seconds,
        "images_per_second": stats["images"] * run.world / max(seconds, 1e-9),
        SCORE: NOT_SCORED,
        "val_average_group": NOT_SCORED,
        **current.aggregate.stats(),
    }
    if epoch >= run.first_scored_epoch:
        val = run.evaluate(module, "val")
        metrics.update({SCORE: val["worst_group"], "val_average_group": val["average_group"], "val_accuracy": val["accuracy"]})
    return metrics


def _log_epoch(writer, run: WorkerRun, metrics: dict) -> None:
    if writer is None:
        return
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and key != "epoch":
            writer.add_scalar(f"{metrics['phase']}/{key}", value, metrics["epoch"])
    writer.flush()
    _sync_tensorboard(writer, run.tensorboard_dir)


def _report_epoch(run: WorkerRun, module: Classifier, current: PhaseRun, metrics: dict, history: list,
                  best: dict | None, finished: dict, fit_epoch: int) -> None:
    """Every worker reports the epoch's metrics; rank 0 attaches the checkpoint to resume from:
    this method's state and best epoch, and the results of the methods already finished."""
    import ray.train

    checkpoint, directory = None, None
    if run.rank == 0:
        checkpoint, directory = _save_checkpoint(
            {
                "method": run.method,
                "model": module.state_dict(),
                "optimizer": current.optimizer.state_dict(),
                "aggregate": current.aggregate.state_dict(),
                "epoch": metrics["epoch"] + 1,
                "phase": current.index,
                "history": history,
                "best": best,
                "finished": finished,
            }
        )
    # fit_epoch counts the epochs of every method in the fit, for the progress bar.
    ray.train.report({**metrics, "fit_epoch": fit_epoch}, checkpoint=checkpoint)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


def _broadcast_from_rank_0(module: Classifier) -> None:
    """Every worker takes rank 0's weights and BatchNorm statistics. DDP keeps the weights
    equal, but each worker's last forward pass moved its own running statistics; the final
    evaluation scores the state rank 0 checkpoints, as a restored run would."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def _final_evaluation(run: WorkerRun, module: Classifier, writer, best: dict | None) -> dict:
    """Load the best-scoring epoch's weights and evaluate them on val and test."""
    if best is not None:
        module.load_state_dict(best["model"])
    _broadcast_from_rank_0(module)
    epoch = best["epoch"] if best is not None else len(run.schedule)
    val = run.evaluate(module, "val", run.train_counts)
    test = run.evaluate(module, "test", run.train_counts)
    if writer is not None:
        writer.add_scalar("final/test_worst_group", test["worst_group"], epoch - 1)
        writer.add_scalar("final/test_average_group", test["average_group"], epoch - 1)
        writer.close()
        _sync_tensorboard(writer, run.tensorboard_dir)
        if storage.is_remote(run.tensorboard_dir or ""):
            shutil.rmtree(writer.log_dir, ignore_errors=True)  # the local copy, uploaded
    return {"best_epoch": epoch - 1, "val": val, "test": test}


def _quiet_train_reports(level: str) -> None:
    """Ray Train logs every ray.train.report at INFO, from loggers named by their file path
    (outside "ray.train", so neither Train's level filter nor ray.log_level reaches them):
    they follow ray.log_level here, and the stage's progress bar shows the epochs."""
    for name in list(logging.root.manager.loggerDict):
        if "/ray/train/" in name.replace("\\", "/"):
            logging.getLogger(name).setLevel(level)


def train_method(run: WorkerRun, resumed: dict | None, finished: dict, fit_epoch: int, may_fail: bool) -> dict:
    """One method's phases, from the seed or from ``resumed`` (its checkpointed state), then
    its final evaluation. ``fit_epoch``: the fit's epochs before this method's first."""
    started, started_at = time.perf_counter(), time.time()
    # Seeded here, not once per worker: every method starts from the weights a fit of its own would.
    seed_torch(run.cfg.seed, run.cfg.deterministic)
    module = build_classifier(run.cfg.backbone, run.n_classes, run.cfg.pretrained_weights).to(run.device)
    start_epoch, history, best = 0, [], None
    if resumed is not None:
        module.load_state_dict(resumed["model"])
        start_epoch, history, best = resumed["epoch"], resumed["history"], resumed["best"]
    writer = _tensorboard(run.tensorboard_dir, run.rank)
    current: PhaseRun | None = None
    for epoch in range(start_epoch, len(run.schedule)):
        index, _ = run.schedule[epoch]
        if current is None or current.index != index:
            current = None  # drop the previous DDP wrapper (and its hooks) first
            current = start_phase(module, run.phases[index], index, run.cfg, run.n_groups, run.train_counts,
                                  distributed=run.world > 1)
            # Optimizer and loss state carry over only within the phase that saved them.
            if epoch == start_epoch and resumed is not None and resumed["phase"] == index:
                current.optimizer.load_state_dict(resumed["optimizer"])
                current.aggregate.load_state_dict(resumed["aggregate"])
        metrics = _run_epoch(run, module, current, epoch)
        if run.ends_pretraining(epoch):
            # The classifier as the synthetic images alone left it, scored on real images: how
            # far they are from the real ones (the domain gap).
            metrics["synthetic_only"] = {split: run.evaluate(module, split, run.train_counts) for split in ("val", "test")}
        history.append(metrics)
        best = _keep_if_best(best, module, metrics, run.first_scored_epoch)
        _log_epoch(writer, run, metrics)
        _report_epoch(run, module, current, metrics, history, best, finished, fit_epoch + epoch)
        if may_fail:
            _maybe_inject_failure(run.cfg, epoch, start_epoch, run.rank, run.world, run.failure_marker)
    final = _final_evaluation(run, module, writer, best)
    # started_at (wall clock) tells the driver which results a fit restored from an earlier job.
    return {**final, "history": history, "seconds": time.perf_counter() - started, "started_at": started_at}


def train_loop(config: dict) -> dict:
    """Ray Train worker entry point; ``config`` is built by ``engine.stages.train.stage``. Trains
    ``config["methods"]`` in order; returns each method's final evaluation and history."""
    # A 1x1 convolution's gradient has other (equivalent) strides on its size-1 axes than
    # DDP's bucket view; DDP copies it, correctly, and warns on every run.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    _quiet_train_reports(config.get("log_level", "WARNING"))

    runs = [WorkerRun.from_config(config, job) for job in config["methods"]]
    latest = _latest_state(runs[0].rank)
    finished: dict = dict(latest["finished"]) if latest else {}
    fit_epoch = 0
    for position, run in enumerate(runs):
        if run.method not in finished:
            resumed = latest if latest is not None and latest["method"] == run.method else None
            if resumed is not None:
                latest = None  # its weights and optimizer state are not needed past this method
            # The test hook fires in the fit's first method only, so it fires once a fit.
            finished[run.method] = train_method(run, resumed, finished, fit_epoch, may_fail=position == 0)
        fit_epoch += len(run.schedule)
    # Rank 0's return value is the Result's return_value.
    return finished


def _maybe_inject_failure(cfg, epoch: int, start_epoch: int, rank: int, world: int, marker: str | None) -> None:
    """Test hook (``TrainConfig._inject_failure_at_epoch``): the last worker's process dies once,
    right after the epoch's checkpoint is registered, as a lost node would take it."""
    if cfg._inject_failure_at_epoch is None or epoch + 1 != cfg._inject_failure_at_epoch:
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
