"""How much of the cluster each stage asks for, resolved one way for every stage and the planner.

A stage's concurrency key (``cluster.num_actors``, ``generate.num_actors``,
``filter.num_actors``, ``finetune.max_concurrent_trials``, ``train.num_workers``) is either a
number, which caps the stage, or ``auto``, which expresses the stage's whole demand:

- a Ray Data actor pool autoscales from 1 actor to as many as its work can use (a CPU-only
  pool: as many as the CPUs there hold, leaving room for the tasks around it);
- Tune queues every unit's trial and starts each as resources appear;
- Train starts one worker per GPU the cluster can reach (or per free CPU share on CPU).

Pending actors, trials and workers are resource requests that Ray's autoscaler turns into
nodes. ``model.device = cpu`` turns every GPU share off, so the same preset runs on a laptop.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from engine.config import AUTO, ActorStageConfig, Config, FinetuneConfig, TrainConfig
from engine.errors import FairsynthError

# A CPU-only pool leaves this many CPUs to the read, write and decode tasks around it: on a
# small machine an actor pool that holds every CPU starves them and the pipeline stalls.
CPU_HEADROOM = 1.0
# Fewer images per DDP worker than this make BatchNorm statistics noisy and leave a GPU
# mostly waiting, so 'auto' never spreads one batch thinner.
MIN_IMAGES_PER_WORKER = 8
UNBOUNDED = sys.maxsize


@dataclass(frozen=True)
class ActorResources:
    """A Ray Data actor stage, resolved: pool bounds, each actor's share, batch size."""

    min_actors: int
    max_actors: int
    num_cpus: float
    num_gpus: float
    batch_size: int

    def map_batches_kwargs(self) -> dict:
        """The ``map_batches`` arguments that place the stage's actors. Ray Data requires an
        explicit batch size whenever GPUs are requested, so it is always given."""
        from ray.data import ActorPoolStrategy

        return {
            "compute": ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors),
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "batch_size": self.batch_size,
        }

    def describe(self) -> str:
        pool = f"{self.max_actors}" if self.min_actors == self.max_actors else f"{self.min_actors}-{self.max_actors}"
        return f"{pool} actors, {self.num_cpus:g} CPU and {self.num_gpus:g} GPU each, batch {self.batch_size}"


def gpu_share(cfg: Config, share: float) -> float:
    """A stage's GPU share after ``model.device``: 'cpu' asks for none."""
    return 0.0 if cfg.model.device == "cpu" else float(share)


def reachable_resources() -> dict[str, float]:
    """What the connected Ray cluster can reach: per resource, the larger of what is there now
    and an autoscaling cluster's configured maximum (None on a local Ray)."""
    import ray
    from ray._private.state import state

    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    try:
        most = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # no autoscaler config in this cluster (a local Ray, a manual one)
        most = {}
    return {k: max(now.get(k, 0.0), float(most.get(k, 0.0))) for k in set(now) | set(most)}


def how_many_fit(reachable: Mapping[str, float], per_task: Mapping[str, float]) -> int:
    """Tasks of ``per_task`` that fit in ``reachable`` at once (at least 1; UNBOUNDED when no
    resource limits them). A CPU-only task leaves CPU_HEADROOM for the tasks around it."""
    fits = []
    for name, need in per_task.items():
        have = reachable.get(name, 0.0)
        if need <= 0 or math.isinf(have):
            continue
        if name == "CPU" and per_task.get("GPU", 0.0) <= 0:
            have = max(need, have - CPU_HEADROOM)
        fits.append(math.floor(have / need + 1e-9))
    return max(1, min(fits)) if fits else UNBOUNDED


def resolve_count(requested: int | str, work: int, fit: int) -> int:
    """A concurrency key's value: a number caps the stage at what its work can use; 'auto' is
    as much as the work can use and the cluster can hold."""
    work = max(1, work)
    if requested == AUTO:
        return max(1, min(work, fit))
    return max(1, min(int(requested), work))


def actor_resources(cfg: Config, stage: str, work: int, reachable: Mapping[str, float] | None = None,
                    check_gpu: bool = True) -> ActorResources:
    """Resolve ``cfg.<stage>`` (cluster, generate or filter) for ``work`` actor calls.

    The pool starts at one actor, so work begins as soon as one can be placed, and grows to
    its maximum as the cluster makes room. With 'auto', GPU actors are bounded by the work
    alone: Ray Data adds one while the last one is placed, so a pool grows onto GPU nodes that
    join mid-stage (the autoscaler's, or ones added by hand) and never waits on absent ones.
    A CPU-only pool is bounded by the CPUs there, less headroom for the tasks around it.
    ``check_gpu=False`` (the planner, which plans for a cluster it is not connected to) skips
    the check that the cluster can supply a GPU."""
    section: ActorStageConfig = getattr(cfg, stage)
    gpus = gpu_share(cfg, section.actor_num_gpus)
    reachable = reachable if reachable is not None else reachable_resources()
    if gpus > 0:
        if check_gpu:
            _require_gpu(f"{stage}.actor_num_gpus", reachable)
        fit = max(1, work)
    else:
        fit = how_many_fit(reachable, {"CPU": section.actor_num_cpus})
    most = resolve_count(section.num_actors, work, fit)
    return ActorResources(1, most, section.actor_num_cpus, gpus, section.batch_size)


def trial_bundle(ft: FinetuneConfig, model_device: str = "auto") -> dict[str, float]:
    """``finetune.trial_resources`` as a Ray resource bundle (CPU and GPU upper-cased, the GPU
    share dropped under ``model.device=cpu``)."""
    bundle: dict[str, float] = {}
    for key, value in ft.trial_resources.items():
        name = key.upper() if key.lower() in ("cpu", "gpu") else key
        if value < 0:
            raise FairsynthError(f"config error: finetune.trial_resources.{key} = {value!r}: must be >= 0")
        bundle[name] = float(value)
    if "GPU" in bundle and model_device == "cpu":
        bundle["GPU"] = 0.0
    if not any(v > 0 for k, v in bundle.items() if k != "GPU") and bundle.get("GPU", 0) <= 0:
        raise FairsynthError(
            f"config error: finetune.trial_resources = {ft.trial_resources!r}: give each trial some "
            "resource, e.g. {CPU: 1} or {GPU: 1}"
        )
    bundle.setdefault("CPU", 1.0)
    return {k: v for k, v in bundle.items() if v > 0}


def max_concurrent_trials(ft: FinetuneConfig) -> int:
    """Tune's cap on trials at once; 0 (no cap) for 'auto', so every trial is queued and the
    autoscaler sees the whole demand."""
    return 0 if ft.max_concurrent_trials == AUTO else int(ft.max_concurrent_trials)


def train_workers(cfg: Config, reachable: Mapping[str, float] | None = None, check_gpu: bool = True) -> int:
    """DDP workers for ``train.num_workers``: a number as given; 'auto' one per GPU the cluster
    can reach (use_gpu) or per CPU share, never fewer than MIN_IMAGES_PER_WORKER per worker."""
    t: TrainConfig = cfg.train
    reachable = reachable if reachable is not None else reachable_resources()
    if use_gpu(cfg) and check_gpu:
        _require_gpu("train.use_gpu", reachable)
    if t.num_workers != AUTO:
        return int(t.num_workers)
    per_worker = {"CPU": t.cpus_per_worker, "GPU": 1.0 if use_gpu(cfg) else 0.0}
    fit = how_many_fit(reachable, per_worker)
    return resolve_count(AUTO, max(1, t.batch_size // MIN_IMAGES_PER_WORKER), fit)


def use_gpu(cfg: Config) -> bool:
    return bool(cfg.train.use_gpu) and cfg.model.device != "cpu"


def check_cluster_supplies(cfg: Config, reachable: Mapping[str, float] | None = None) -> None:
    """Fail at start, in one line, when a stage asks for GPUs that this cluster can never
    supply (no GPU now, and no autoscaler that could add one)."""
    if cfg.model.device == "cpu":
        return
    asking = [key for key, share in cfg.gpu_shares().items() if share > 0]
    if asking:
        _require_gpu(asking[0], reachable if reachable is not None else reachable_resources())


def _require_gpu(key: str, reachable: Mapping[str, float]) -> None:
    if reachable.get("GPU", 0.0) <= 0:
        raise FairsynthError(
            f"{key} asks for a GPU but this Ray cluster has none and cannot add any; run on a "
            "GPU machine or cluster, or set model.device=cpu to run every stage on CPU"
        )
