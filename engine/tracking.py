"""Experiment trackers a finished run is also logged to (config ``tracking``).

The run directory stays the record; a tracker gets a copy in the tool people already browse:
the resolved config as parameters, every result as a metric, and the report and tables as
artifacts. Trackers are configured the way their users already configure them (for MLflow,
``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_NAME``), so fairsynth adds no settings.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from engine import storage
from engine.config import Config
from engine.errors import FairsynthError
from engine.redact import redact

log = logging.getLogger(__name__)

# Logged per (method, severity) row of results.json.
RESULT_METRICS = ("test_worst_group", "test_average_group", "val_worst_group")
ARTIFACTS = ("report.html", "results.md", "results.json", "config.yaml", "stage_seconds.json")
MAX_PARAM_CHARS = 500  # MLflow rejects longer parameter values on some stores


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {'train.epochs': '8', ...}, the form trackers compare runs by."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_CHARS]
    return flat


def result_metrics(rows: list[dict]) -> dict[str, float]:
    """results.json rows -> {'lora/0.999/test_worst_group': 0.45, ...} (fidelity included)."""
    metrics = {}
    for row in rows:
        key = f"{row['method']}/{row['severity']}"
        for metric in RESULT_METRICS:
            if row.get(metric) is not None:
                metrics[f"{key}/{metric}"] = float(row[metric])
        fidelity = row.get("synthetic_fidelity")
        if fidelity:
            metrics[f"{key}/group_fidelity"] = float(fidelity["after"])
            metrics[f"{key}/group_fidelity_before_filter"] = float(fidelity["before"])
    return metrics


class Tracker:
    name = "none"

    def check(self) -> None:
        """Fail before any compute when the tracker cannot be used."""

    def log_run(self, cfg: Config, run_root, rows: list[dict]) -> None:
        """Log a finished run."""


class MlflowTracker(Tracker):
    name = "mlflow"

    def check(self) -> None:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise FairsynthError(
                "tracking = 'mlflow' but mlflow is not installed: pip install mlflow-skinny (or set tracking=none)"
            ) from None

    def log_run(self, cfg: Config, run_root, rows: list[dict]) -> None:
        import mlflow

        root = storage.as_path(run_root)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "fairsynth"))
        with mlflow.start_run(run_name=root.name) as run:
            mlflow.log_params(flatten(cfg.model_dump(mode="json")))
            mlflow.set_tag("fairsynth.run_dir", redact(str(root)))
            mlflow.log_metrics(result_metrics(rows))
            with tempfile.TemporaryDirectory(prefix="fairsynth-track-") as scratch:
                for name in ARTIFACTS:
                    if storage.exists(root / name):
                        local = Path(scratch) / name
                        local.write_bytes(storage.read_bytes(root / name))
                        mlflow.log_artifact(str(local))
        log.info("logged to MLflow run %s (%s)", run.info.run_id, redact(mlflow.get_tracking_uri()))


TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (Tracker, MlflowTracker)}


def get_tracker(cfg: Config) -> Tracker:
    return TRACKERS[cfg.tracking]()
