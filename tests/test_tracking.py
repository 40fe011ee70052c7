"""tracking: mlflow logs a finished run's config, results and report to MLflow (a local file
store here, as a user's MLFLOW_TRACKING_URI would name a server)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from engine.config import Config, load_config
from engine.errors import FairsynthError
from engine.html_report import write_html_report
from engine.tracking import MlflowTracker, get_tracker

mlflow = pytest.importorskip("mlflow")


def test_mlflow_gets_the_config_every_result_and_the_report(finished_run: Path, tmp_path, monkeypatch):
    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "fairness-study")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow prefers a database; a folder suffices here
    write_html_report(finished_run)
    cfg = Config.model_validate(yaml.safe_load((finished_run / "config.yaml").read_text()))
    cfg.tracking = "mlflow"
    rows = json.loads((finished_run / "results.json").read_text())
    get_tracker(cfg).log_run(cfg, finished_run, rows)

    client = mlflow.tracking.MlflowClient(store)
    experiment = client.get_experiment_by_name("fairness-study")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["train.epochs"] == str(cfg.train.epochs)
    assert run.data.params["model.base"] == cfg.model.base
    for row in rows:
        for metric in ("test_worst_group", "test_average_group"):
            assert run.data.metrics[f"{row['method']}/{row['severity']}/{metric}"] == pytest.approx(row[metric])
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "results.json", "results.md", "config.yaml"} <= logged


def test_mlflow_missing_fails_before_any_work(monkeypatch, tmp_path):
    from engine.pipeline import run_full

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    cfg = load_config("tiny", ["tracking=mlflow", f"run_dir={tmp_path / 'run'}"])
    stages = []
    with pytest.raises(FairsynthError, match="pip install mlflow-skinny"):
        run_full(cfg, on_stage=stages.append)
    assert stages == [] and not (tmp_path / "run").exists()  # no stage started, no run directory


def test_the_mlflow_log_line_names_the_server_without_its_password(finished_run: Path, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    # What a server URI with credentials in it reads back as, once the run is logged.
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "https://alice:hunter2-9c1f@mlflow.example.com")
    cfg = Config.model_validate(yaml.safe_load((finished_run / "config.yaml").read_text()))
    rows = json.loads((finished_run / "results.json").read_text())
    with caplog.at_level("INFO", logger="engine.tracking"):
        MlflowTracker().log_run(cfg, finished_run, rows)
    (line,) = [r.getMessage() for r in caplog.records if "logged to MLflow run" in r.getMessage()]
    assert line.endswith("(https://alice:***@mlflow.example.com)")
