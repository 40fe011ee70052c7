"""RUN/report.html: self-contained, faithful to results.json, and whole in a real browser
(Debian's Chromium, driven headless by Playwright; the test skips where it is not installed)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from engine.errors import FairsynthError
from engine.html_report import write_html_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without these, Chromium reaches out to Google's hosts at start, which a closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def run_dir(finished_run: Path) -> Path:
    write_html_report(finished_run)
    return finished_run


def test_report_is_self_contained_and_shows_every_result(run_dir):
    page = (run_dir / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count('src="data:image/png;base64,') == 3  # the two plots and the grid
    rows = json.loads((run_dir / "results.json").read_text())
    for row in rows:
        for metric in ("val_worst_group", "val_average_group", "test_worst_group", "test_average_group"):
            cell = (f'data-method="{row["method"]}" data-severity="{row["severity"]}" '
                    f'data-metric="{metric}" data-value="{row[metric]}">{100 * row[metric]:.1f}</td>')
            assert cell in page, (row["method"], metric)
    for section in ("Results", "Per-group accuracy", "Synthetic samples", "Stage timings", "Resolved config"):
        assert f"<h2>{section}</h2>" in page


def test_report_embeds_no_file_a_link_leads_out_of_the_run(finished_run: Path, tmp_path):
    """A plot, a grid folder or config.yaml that is a link to a file outside the run (say
    ~/.aws/credentials) is left out of the page, which is mailed and uploaded to MLflow."""
    secret = tmp_path / "credentials"
    secret.write_text("[default]\naws_secret_access_key = FAKE-SECRET-7f3a9c\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "inside.png").symlink_to(secret)
    (tmp_path / "elsewhere" / "plain.png").write_bytes(b"FAKE-SECRET-7f3a9c as a file")
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "plots" / "leak.png").symlink_to(secret)
    (run / "seed_1").mkdir()
    (run / "seed_1" / "grids").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (run / "config.yaml").unlink()
    (run / "config.yaml").symlink_to(secret)
    secret_json = tmp_path / "key.json"
    secret_json.write_text(json.dumps({"FAKE-SECRET-json": {"token": {"private_key": 1.0}}}))
    (run / "stage_seconds.json").unlink()
    (run / "stage_seconds.json").symlink_to(secret_json)

    page = write_html_report(run).read_text()
    embedded = [base64.b64decode(part.split('"', 1)[0]) for part in page.split("data:image/png;base64,")[1:]]
    assert len(embedded) == 3  # the run's own two plots and grid
    assert "FAKE-SECRET" not in page and not any(b"FAKE-SECRET" in data for data in embedded)
    assert "<h2>Results</h2>" in page and "<h2>Resolved config</h2>" not in page


def test_report_refuses_a_results_file_that_is_a_link(finished_run: Path, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "report.html").unlink(missing_ok=True)  # another test's report of the shared run
    (tmp_path / "results.json").write_bytes((run / "results.json").read_bytes())
    (run / "results.json").unlink()
    (run / "results.json").symlink_to(tmp_path / "results.json")
    with pytest.raises(FairsynthError, match="results.json is not a regular file inside the run directory"):
        write_html_report(run)
    assert not (run / "report.html").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(run_dir):
    from playwright.sync_api import sync_playwright

    rows = json.loads((run_dir / "results.json").read_text())
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((run_dir / "report.html").as_uri(), wait_until="load")
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
            cells = page.eval_on_selector_all(
                "td[data-metric]", "els => els.map(e => [e.dataset.method, e.dataset.metric, e.textContent])")
        finally:
            browser.close()
    assert errors == []
    assert len(images) == 3 and all(complete and width > 0 for complete, width in images)
    shown = {(method, metric): float(text) for method, metric, text in cells}
    expected = {(r["method"], m): round(100 * r[m], 1) for r in rows
                for m in ("val_worst_group", "val_average_group", "test_worst_group", "test_average_group")}
    assert shown == expected


def test_console_summary_fits_a_screen_and_counts_shared_stages_once(finished_run):
    from engine.report import console_summary, stage_totals

    rows = json.loads((finished_run / "results.json").read_text())
    # erm, group_dro and lora each list data 0.1 and cluster 12 (run once) and their own train.
    assert stage_totals(rows) == pytest.approx({"data": 0.1, "cluster": 12.0, "train": 40.0 + 41.0 + 42.0})
    assert list(stage_totals(rows)) == ["data", "cluster", "train"]  # in the order the stages run
    summary = console_summary(rows, (finished_run / "results.md").read_text(), finished_run)
    assert len(summary.splitlines()) < 25
    assert f"report: {finished_run}/report.html" in summary and "train 123 s" in summary
    assert "| LoRA |" in summary and "per unit" not in summary
