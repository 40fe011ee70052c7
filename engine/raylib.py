"""Starting or joining Ray the same way in every job."""

from __future__ import annotations

import logging
import os

import ray

from engine.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Join the configured cluster, or start a local Ray; a no-op when already connected."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs = {"ignore_reinit_error": True, "log_to_driver": True}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local" starts a fresh instance even when another Ray runs on this machine, so a
        # laptop run never lands on someone else's cluster and its busy CPUs.
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, **kwargs)
    log.info("ray resources: %s", ray.cluster_resources())


def device_for(num_gpus: float) -> str:
    """'cuda' when the actor or trial was given a GPU, else 'cpu'."""
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
