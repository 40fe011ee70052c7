"""The `fairsynth` command, run as users run it (the installed console script): --help lists
the presets and every config key, `plan` plans the tiny preset, bad input is one line with
exit code 2, and `report` rebuilds a run's results and report.html from its metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import config_keys, preset_summaries
from engine.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "fairsynth"
# The console script `pip install -e .` puts beside the interpreter; the module otherwise.
FAIRSYNTH = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "engine.commands"]


def fairsynth(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # From a folder outside the checkout: the command must not depend on the working directory.
    return subprocess.run([*FAIRSYNTH, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_lists_commands_presets_and_every_config_key(tmp_path):
    out = fairsynth("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for command in ("run", "plan", "stats", "report", "bench"):
        assert f"\n  {command} " in out.stdout
    for preset in preset_summaries():
        assert f"\n  {preset} " in out.stdout
    assert {"tiny", "waterbirds"} <= set(preset_summaries())
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")}
    keys = [key for key, _, _ in config_keys()]
    assert "generate.images_per_group" in keys and "data.builtin.n_train" in keys
    assert set(keys) <= listed


def test_a_command_help_names_the_command_and_lists_the_keys(tmp_path):
    out = fairsynth("run", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: fairsynth run")
    assert "--run-dir" in out.stdout and "--set" in out.stdout and "train.epochs" in out.stdout


def test_plan_runs_on_the_tiny_preset(tmp_path):
    out = fairsynth("plan", "--config", "tiny", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads(out.stdout)
    assert plan["config"] == "tiny"
    assert list(plan["stages"]) == ["cluster", "finetune", "generate", "filter", "train"]
    assert plan["total"]["flops"] > 0 and plan["total"]["wall_seconds"] > 0


@pytest.mark.parametrize("command, override, named", [
    ("plan", "generate.steps=many", "generate.steps"),
    ("run", "generate.no_such_key=1", "generate.no_such_key"),
    # Used to fail only after fine-tuning and generation, with a traceback from the filter stage.
    ("run", "filter.class_prompt_template=a photo of a {class}", "unknown placeholder {class}"),
])
def test_a_bad_set_exits_2_with_one_line(tmp_path, command, override, named):
    run_dir = ["--run-dir", str(tmp_path / "run")] if command == "run" else []
    out = fairsynth(command, "--set", override, *run_dir, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config error:") and named in lines[0], out.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def _metrics(worst: float) -> dict:
    per_group = [1.0, worst, 0.5, 0.75]
    split = {"worst_group": worst, "average_group": sum(per_group) / 4, "per_group": per_group}
    names = ["landbird on land", "landbird on water", "waterbird on land", "waterbird on water"]
    return {"method": "erm", "test": split, "val": split, "group_names": names}


def _trained_erm(root: Path, worst: float) -> None:
    """One run directory's files as the job leaves them, with erm trained and lora not."""
    root.mkdir(exist_ok=True)
    (root / "stage_seconds.json").write_text(json.dumps({"0.95": {"erm": {"data": 1.5, "train": 20.0}}}))
    folder = root / "severity-0.95" / "train" / "erm"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(_metrics(worst)))


def _finished_run(root: Path, seeds: list[int] | None = None) -> None:
    """A job's run directory that stopped after training erm (lora never trained)."""
    overrides = ["methods=[erm,lora]", "severities=[0.95]", f"run_dir={root}"]
    cfg = load_config("tiny", overrides + ([f"seeds={seeds}"] if seeds else []))
    root.mkdir()
    (root / "config.yaml").write_text(cfg.to_yaml())
    if not seeds:
        _trained_erm(root, 0.25)
        _data_stage(cfg, root)
    for i, seed in enumerate(seeds or []):
        _trained_erm(root / f"seed_{seed}", 0.25 + 0.5 * i)


def _data_stage(cfg, root: Path) -> None:
    """The data stage a finished run holds (the report's chance row reads its split sizes)."""
    from engine.runs import RunDir
    from engine.stages.data.stage import run_data_stage

    small = cfg.model_copy(deep=True)
    small.data.severity = 0.95
    small.data.builtin.n_test = 40
    run_data_stage(small, RunDir(root / "severity-0.95"))


def test_report_rebuilds_the_results_of_a_run(tmp_path):
    run = tmp_path / "run"
    _finished_run(run)
    out = fairsynth("report", str(run), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((run / "results.json").read_text())
    assert [(r["method"], r["severity"]) for r in rows] == [("chance", 0.95), ("erm", 0.95)]
    assert rows[1]["test_worst_group"] == 0.25 and rows[1]["stage_seconds"] == {"data": 1.5, "train": 20.0}
    # Chance on 10 test images per group: the expected minimum of four Binomial(10, 1/2) / 10.
    assert rows[0]["test_worst_group"] == pytest.approx(0.3394, abs=1e-4) and rows[0]["test_average_group"] == 0.5
    table = (run / "results.md").read_text()
    assert "| ERM | 25.0 / 62.5 | 25.0 / 62.5 | 100.0 / 25.0 / 50.0 / 75.0 |" in table and "LoRA" not in table
    assert "| Chance (a coin flip) |" in table
    assert table in out.stdout
    assert (run / "plots" / "per_group_severity-0.95.png").stat().st_size > 0
    page = (run / "report.html").read_text()
    assert 'data-method="erm"' in page and 'data-value="0.25"' in page and 'data-method="lora"' not in page


def test_report_of_a_run_over_seeds_shows_each_seed_and_their_mean(tmp_path):
    run = tmp_path / "run"
    _finished_run(run, seeds=[0, 1])
    out = fairsynth("report", str(run), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = json.loads((run / "results.json").read_text())
    assert row["seeds"] == [0, 1] and row["test_worst_group"] == pytest.approx(0.5)
    assert row["test_worst_group_std"] == pytest.approx(0.25 * 2**0.5)  # sample std of 0.25 and 0.75
    for seed, worst in ((0, 0.25), (1, 0.75)):
        (own,) = json.loads((run / f"seed_{seed}" / "results.json").read_text())
        assert own["test_worst_group"] == worst
    assert (run / "report.html").exists()


@pytest.mark.parametrize("make", ["nothing", "config only"])
def test_report_of_a_folder_without_results_is_one_line(tmp_path, make):
    run = tmp_path / "run"
    if make == "config only":
        run.mkdir()
        (run / "config.yaml").write_text(load_config("tiny").to_yaml())
    out = fairsynth("report", str(run), cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(run) in lines[0], out.stderr


def test_jobs_full_still_runs_as_a_script():
    """`ray job submit -- python jobs/full.py` runs the file itself, not the command."""
    out = subprocess.run([sys.executable, "jobs/full.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "presets" in out.stdout and "--run-dir" in out.stdout
