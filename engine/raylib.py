"""Starting or joining Ray the same way in every job."""

from __future__ import annotations

import logging
import os
import signal
import threading

import ray

from engine.config import RayConfig
from engine.console import route_ray_loggers, route_ray_output
from engine.errors import FairsynthError

log = logging.getLogger(__name__)

# The address of the local Ray this process started and named in RAY_ADDRESS, so that a later
# init_ray in the same process (after ray.shutdown) starts afresh instead of joining it.
_started_address: str | None = None


def init_ray(cfg: RayConfig) -> str | None:
    """Join the configured cluster, or start a local Ray; a no-op when already connected.
    Returns the address of the dashboard of a local Ray it started, else None."""
    if ray.is_initialized():
        return None
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    # LoggingConfig also reconfigures this process's root logger (level and a handler of its
    # own); a job that set up its logging keeps it, or its INFO lines vanish and the rest
    # print twice.
    root = logging.getLogger()
    job_logging = (root.level, list(root.handlers)) if root.handlers else None
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Tune warns when trials checkpoint more often than every few seconds, which short CPU
    # trials do by design; the checkpoints are what lets a crashed trial resume.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Ray Data logs every dataset execution at INFO, also from processes the job does not
    # create (Train's split coordinators), which read their level from the environment a local
    # Ray inherits. At ray.log_level=INFO those lines are back, on the console and in the logs.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", cfg.log_level)
    # Tune, Train and Data log every trial report, epoch and dataset execution at INFO: at the
    # default WARNING a run's console shows its own progress lines and what went wrong.
    kwargs = {
        "ignore_reinit_error": True,
        "log_to_driver": True,
        "logging_config": ray.LoggingConfig(log_level=cfg.log_level),
    }
    global _started_address
    from_env = os.environ.get("RAY_ADDRESS")
    if from_env and from_env == _started_address:
        from_env = None  # our own earlier instance, shut down since
    address = cfg.address or from_env
    route_ray_loggers()  # what ray.init logs (token authentication turned on, ...) to the run's log
    if address:
        context = ray.init(address=address, **kwargs)
    else:
        # Ray's runtime-env agent logs each runtime env at INFO, and Tune puts the driver's
        # AWS_SECRET_ACCESS_KEY into its trials' runtime env: Ray's own components log at
        # WARNING, so no secret lands in the session's log files.
        os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
        # "local" starts a fresh instance even when another Ray runs on this machine, so a
        # laptop run never lands on someone else's cluster and its busy CPUs.
        context = ray.init(
            address="local", num_cpus=cfg.num_cpus, include_dashboard=cfg.dashboard,
            dashboard_host="127.0.0.1", **kwargs,
        )
        # Ray's libraries look a cluster up again by themselves (Train's placement-group
        # cleaner asks the state API); with another job's Ray on this machine that lookup
        # finds several and fails. Naming ours keeps every lookup on this job's instance.
        _started_address = context.address_info["gcs_address"]
        os.environ["RAY_ADDRESS"] = _started_address
    if job_logging is not None:
        root.setLevel(job_logging[0])
        root.handlers[:] = job_logging[1]
    _quiet_driver_logs(cfg.log_level)
    route_ray_output()  # Ray's own output to the run's log, when the job routes it there
    dashboard = f"http://{context.dashboard_url}" if not address and context.dashboard_url else None
    if dashboard:
        log.info("ray dashboard: %s", dashboard)
    # Ray installs a native SIGTERM handler that aborts the process; the job's own handler
    # (engine.cli) unwinds cleanly instead, so put it back.
    if previous_sigterm is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous_sigterm)
    log.info("ray resources: %s", ray.cluster_resources())
    return dashboard


def _quiet_driver_logs(level: str) -> None:
    """The driver-side logs of Ray's libraries at ``level`` on the console, as LoggingConfig
    does in workers."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger on import)

    for handler in logging.getLogger("ray.data").handlers:
        if "File" not in type(handler).__name__:  # the console handler, not SessionFileHandler
            handler.setLevel(level)
    for library in ("ray.tune", "ray.train"):
        logging.getLogger(library).setLevel(level)


def device_for(num_gpus: float, model_device: str = "auto") -> str:
    """The device an actor, task or trial runs on: 'cuda' when Ray gave it a GPU (and
    ``model.device`` is not 'cpu'), else 'cpu'; 'cuda' asked for without a GPU is an error."""
    import torch

    if model_device == "cpu":
        return "cpu"
    if num_gpus > 0 and torch.cuda.is_available():
        return "cuda"
    if model_device == "cuda":
        raise FairsynthError(
            "model.device = 'cuda' but this worker sees no GPU; give it one (the stage's "
            "actor_num_gpus or trial_resources GPU > 0) or set model.device=auto"
        )
    return "cpu"
