"""Starting or joining Ray the same way in every job."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import signal
import socket
import threading
import time

import ray

from engine.config import RayConfig
from engine.console import route_ray_loggers, route_ray_output
from engine.errors import FairsynthError

log = logging.getLogger(__name__)

# The environment variable a head's GCS takes its port from (ray_constants.GCS_PORT_ENVIRONMENT_VARIABLE).
GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"
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
        context = start_local_ray(num_cpus=cfg.num_cpus, include_dashboard=cfg.dashboard, **kwargs)
        _started_address = context.address_info["gcs_address"]
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


def free_port() -> int:
    """A TCP port that nothing listens on now, below the OS's ephemeral range (and above the
    worker ports other Rays take, 10002-19999): a port the OS hands out for bind(0) or
    connect() could be taken by another process before the Ray process that needs it binds."""
    low, high = 20000, _ephemeral_ports_start()
    for _ in range(100) if high - low > 1000 else ():
        port = random.SystemRandom().randrange(low, high)
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:  # no room below the ephemeral range: let the OS pick
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _ephemeral_ports_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS's range starts at 49152


# The ports every node of a Ray this project starts opens, 0 so that each process binds one
# the OS picks: Ray's own defaults are fixed (dashboard agent 52365, ...) and the first Ray on a
# machine holds them, so a second one's agent fails to start ("No available agent to submit job").
NODE_PORTS = {
    "dashboard_agent_listen_port": 0,  # the dashboard agent's HTTP server (job submission)
    "metrics_agent_port": 0,  # the dashboard agent's gRPC server
    "metrics_export_port": 0, "runtime_env_agent_port": 0,
    "node_manager_port": 0, "object_manager_port": 0, "min_worker_port": 0, "max_worker_port": 0,
}


def head_ports() -> dict[str, int]:
    """A head's ports as ``RayParams`` (and so ``ray.cluster_utils.Cluster``'s node arguments)
    names them: :data:`NODE_PORTS`, and a free GCS and dashboard port named here, since their
    addresses must be known before they start (Ray's defaults: 6379 and 8265)."""
    return {"gcs_server_port": free_port(), "dashboard_port": free_port(), **NODE_PORTS}


def ray_start_head_flags(gcs_port: int, dashboard_port: int) -> list[str]:
    """``ray start --head`` flags for every port the head opens, the GCS and dashboard on the
    ports given and the rest each on a free one (the CLI's defaults are Ray's fixed ports, the
    Ray Client server's 10001 among them)."""
    return [
        f"--port={gcs_port}", f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
    ]


@contextlib.contextmanager
def _head_ports_of(ports: dict[str, int]):
    """``ray.init`` takes no argument for most of a local head's ports, so its ``RayParams``
    gets them as defaults while it starts the head (only arguments ``ray.init`` leaves unset)."""
    import ray._private.parameter as parameter

    original = parameter.RayParams

    class RayParams(original):
        def __init__(self, *args, **kwargs):
            for name, port in ports.items():
                if kwargs.get(name) is None:
                    kwargs[name] = port
            super().__init__(*args, **kwargs)

    parameter.RayParams = RayParams
    try:
        yield
    finally:
        parameter.RayParams = original


def _set_environ(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _name_own_address(gcs_port: int) -> dict[str, str | None]:
    """Set RAY_ADDRESS to the head about to start on ``gcs_port``, before it starts, so every
    process it starts inherits it; returns the variables as they were. Ray's libraries look
    the cluster up again by themselves, in workers too (Ray Train's placement-group cleaner
    asks the state API), and without RAY_ADDRESS they search the machine, find every Ray on it
    and fail ("Found multiple active Ray instances") or pick another's."""
    before = {name: os.environ.get(name) for name in ("RAY_ADDRESS", GCS_PORT_VARIABLE)}
    # The environment is the one way to name the GCS port to ray.init.
    _set_environ({"RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{gcs_port}", GCS_PORT_VARIABLE: str(gcs_port)})
    return before


def start_local_ray(num_cpus: int | None = None, include_dashboard: bool | None = None, **kwargs):
    """``ray.init(address="local", ...)`` that shares the machine: every port of the new head
    is free (:func:`head_ports`), the dashboard listens on 127.0.0.1 only, and RAY_ADDRESS
    names this head here and in every process it starts. Returns ray.init's context."""
    ports = head_ports()
    gcs_port, dashboard_port = ports.pop("gcs_server_port"), ports.pop("dashboard_port")
    before = _name_own_address(gcs_port)
    try:
        with _head_ports_of(ports):
            context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard,
                               dashboard_host="127.0.0.1", dashboard_port=dashboard_port, **kwargs)
    except BaseException:
        _set_environ(before)
        raise
    _set_environ({GCS_PORT_VARIABLE: before[GCS_PORT_VARIABLE]})
    actual = context.address_info["gcs_address"]
    if actual != os.environ["RAY_ADDRESS"]:  # a Ray that ignored the port asked for
        log.warning("the local Ray's GCS listens on %s, not on the port asked for", actual)
        os.environ["RAY_ADDRESS"] = actual
    return context


@contextlib.contextmanager
def local_ray(num_cpus: int, include_dashboard: bool = False, **kwargs):
    """:func:`start_local_ray` for tests and benchmarks: shut down on exit, and RAY_ADDRESS put
    back, so a later Ray or job of the same process does not look for this one."""
    before = os.environ.get("RAY_ADDRESS")
    try:
        yield start_local_ray(num_cpus=num_cpus, include_dashboard=include_dashboard, **kwargs)
    finally:
        ray.shutdown()
        _set_environ({"RAY_ADDRESS": before})


def _cluster_class():
    from ray.cluster_utils import Cluster

    class SharingCluster(Cluster):
        """Every node it adds, the head included, opens its ports as :data:`NODE_PORTS` says."""

        def add_node(self, wait: bool = True, **node_args):
            return super().add_node(wait, **{**NODE_PORTS, **node_args})

    return SharingCluster


@contextlib.contextmanager
def local_cluster(**head_args):
    """A multi-node Ray on this machine (``ray.cluster_utils.Cluster``; add nodes with
    ``add_node``), for tests and benchmarks, that shares the machine as
    :func:`start_local_ray` does, its worker nodes included. On exit it is shut down,
    RAY_ADDRESS is put back, and the record of it that Ray leaves for ``ray.init()`` to join
    is removed."""
    ports = head_ports()
    before = _name_own_address(ports["gcs_server_port"])
    cluster = None
    try:
        cluster = _cluster_class()(initialize_head=True, head_node_args={
            "dashboard_host": "127.0.0.1", **ports, **head_args})
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        _set_environ(before)
        from ray._private.utils import get_ray_address_file, read_ray_address

        if cluster is not None and read_ray_address() == cluster.address:
            with contextlib.suppress(OSError):
                os.remove(get_ray_address_file(None))


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


# --- a node lost under a driver-side step ------------------------------------------------------

NODE_LOSS_ATTEMPTS = 5
# Ray marks a node dead only after missing health checks (about 15 s by default) and places
# new actors on it until then: a retry waits for that, then longer.
NODE_LOSS_PAUSES_S = (5.0, 10.0, 20.0, 40.0)
_NODE_LOSS_TEXT = re.compile(r"its node has died|NodeDiedError|WorkerCrashedError|ObjectLostError")


def lost_with_a_node(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) says a worker, an actor or an object was lost with
    its node, as on a spot cluster, rather than that the code failed."""
    from ray import exceptions as rex

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # An actor that crashed on its own counts too: when a raylet dies, its actors' errors
        # do not always say so, and a deterministic step that fails again is raised in the end.
        if isinstance(current, rex.RayActorError) and not current.actor_init_failed:
            return True
        if isinstance(current, rex.NodeDiedError | rex.WorkerCrashedError | rex.ObjectLostError):
            return True
        # A task's error that could not be unpickled arrives as its text only.
        if isinstance(current, rex.UnserializableException) and _NODE_LOSS_TEXT.search(str(current)):
            return True
        # Only what caused it: an unrelated error raised while handling a node loss is a bug.
        current = getattr(current, "cause", None) or current.__cause__
    return False


def _loss_line(error: BaseException) -> str:
    """The line of ``error`` that says what was lost (Ray's first line is often generic)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if _NODE_LOSS_TEXT.search(line)), lines[0] if lines else type(error).__name__)[:200]


def retry_node_loss(what: str, step, *args, attempts: int = NODE_LOSS_ATTEMPTS, **kwargs):
    """``step(*args, **kwargs)``, started again when a node dies under it. Ray retries tasks and
    restarts actors, but not a driver-side step that waits on them: Ray Data's listing of a
    dataset's Parquet files fails whole when the actor reading the footers loses its node
    (docs/reliability.md, "Chaos"). Steps given here are deterministic, so a second try gives
    what the first would have. Tries ``attempts`` times, pausing NODE_LOSS_PAUSES_S between."""
    for attempt in range(1, attempts):
        try:
            return step(*args, **kwargs)
        except Exception as error:
            if not lost_with_a_node(error):
                raise
            pause = NODE_LOSS_PAUSES_S[min(attempt, len(NODE_LOSS_PAUSES_S)) - 1]
            log.warning("%s: a Ray node died under it (%s); starting it again in %.0f s (%d of %d)",
                        what, _loss_line(error), pause, attempt, attempts - 1)
            time.sleep(pause)
    return step(*args, **kwargs)
