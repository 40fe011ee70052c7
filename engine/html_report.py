"""``RUN/report.html``: one page that shows a colleague what a run did, with nothing beside it.

Every picture is inlined as a data URI and the page has no script, so the file can be mailed,
attached to a ticket or opened offline. It holds, from the run directory alone:

- the results table (worst-group and average-group accuracy, synthetic group fidelity), each
  figure in a cell that names its method, severity and metric (``data-*`` attributes), so a
  test can hold the page to results.json;
- the per-group accuracy plots and the sample grids (filtered-out images framed in red);
- stage timings, the planner's prediction beside them, and the resolved config.

``fairsynth report RUN`` (or :func:`write_html_report`) rebuilds it from an existing run.
"""

from __future__ import annotations

import base64
import html
import logging
from datetime import datetime, timezone
from pathlib import Path

from engine import storage
from engine.errors import FairsynthError
from engine.report import (
    _fidelity_cell,
    _pct,
    _synthetic_only_cell,
    in_run_order,
    method_title,
    metric_cell,
    severity_title,
)
from engine.runs import RunPath, atomic_write_text, read_json

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; } th, td { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #eee; } pre { background: #f7f7f7; padding: 1em; overflow: auto; }
.note { color: #666; font-size: 0.9em; }
"""


def _escape(value) -> str:
    return html.escape(str(value), quote=True)


def _image(path: RunPath, alt: str) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{_escape(alt)}">'


def _table(header: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{_escape(h)}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _metric_td(row: dict, metric: str) -> str:
    """One accuracy in percent; the cell carries the exact value it shows, for checking."""
    value, shown = row[metric], metric_cell(row, metric)
    return (f'<td class="num" data-method="{_escape(row["method"])}" data-severity="{_escape(row["severity"])}" '
            f'data-metric="{metric}" data-value="{_escape(value)}">{_escape(shown)}</td>')


def results_section(rows: list[dict]) -> str:
    seeds = list(dict.fromkeys(s for r in rows for s in r.get("seeds", [])))
    over = f", mean ± sample std over seeds {', '.join(map(str, seeds))}" if seeds else ""
    body = []
    for r in rows:
        per_group = " / ".join(_pct(a) for a in r["test_per_group"])
        metrics = "".join(_metric_td(r, m) for m in ("val_worst_group", "val_average_group",
                                                      "test_worst_group", "test_average_group"))
        body.append(
            f"<tr><td>{_escape(method_title(r['method']))}</td>"
            f"<td>{_escape(severity_title(r['severity']))}</td>{metrics}"
            f"<td>{_escape(per_group)}</td><td>{_escape(_synthetic_only_cell(r))}</td>"
            f"<td>{_escape(_fidelity_cell(r.get('synthetic_fidelity')))}</td>"
            f"<td class=\"num\">{_escape(r.get('synthetic_images', 0))}</td></tr>"
        )
    names = next((r["group_names"] for r in rows if r.get("group_names")), None) or []
    header = ["Method", "Severity", "Val worst-group (%)", "Val average-group (%)", "Test worst-group (%)",
              "Test average-group (%)", "Test per group: " + " / ".join(names) + " (%)",
              "Synthetic only, test WGA / AGA (%)", "Group fidelity, kept (all), worst unit (%)", "Synthetic images"]
    return (f"<h2>Results</h2><p class=\"note\">Accuracy{_escape(over)}. Chance: what guessing scores on the same "
            "split. Synthetic only: the classifier after stage 1, trained on synthetic images alone. Group fidelity: "
            "the share of synthetic images an independent judge reads as their unit's class and attribute.</p>"
            + _table(header, body))


def _inside_run(path: RunPath, root: RunPath) -> bool:
    """Whether the report may embed ``path``: a regular file of the run itself, never a link,
    nor a file reached through a linked folder (it would carry, say, a credentials file
    into a page that is mailed and uploaded). Object stores have no links."""
    if storage.is_remote(str(root)):
        return True
    local = Path(path)
    if local.is_symlink() or not local.is_file() or not local.resolve().is_relative_to(Path(root).resolve()):
        log.warning("report: not embedding %s, which is not a regular file inside the run directory", path)
        return False
    return True


def _run_files(root: RunPath, *patterns: str) -> list[RunPath]:
    return [p for pattern in patterns for p in sorted(root.glob(pattern)) if _inside_run(p, root)]


def _pictures(paths: list[RunPath], root: RunPath, caption) -> str:
    figures = []
    for path in paths:
        label = caption(path.relative_to(root))
        figures.append(f"<figure>{_image(path, label)}<figcaption>{_escape(label)}</figcaption></figure>")
    return "".join(figures)


def plots_section(root: RunPath) -> str:
    plots = _run_files(root, "plots/*.png")
    if not plots:
        return ""
    return "<h2>Per-group accuracy</h2>" + _pictures(plots, root, lambda rel: f"test accuracy per group ({rel.stem})")


def grids_section(root: RunPath) -> str:
    # A job of several seeds keeps each seed's grids in its own run directory.
    grids = _run_files(root, "grids/*.png", "seed_*/grids/*.png")
    if not grids:
        return ""
    note = ("<p class=\"note\">One row per fine-tuned unit, its first images in seed order; "
            "images the filter dropped have a red frame.</p>")
    return "<h2>Synthetic samples</h2>" + note + _pictures(grids, root, lambda rel: str(rel.with_suffix("")))


def _predicted_seconds(root: RunPath) -> dict[tuple[str, str, str], float]:
    """The planner's seconds per (severity, method, stage) on this machine's CPU, or {} (with
    a log line) when the run cannot be planned here."""
    if storage.is_remote(str(root)):
        return {}  # the planner reads a local run; `jobs/plan.py --compare` on a local copy
    try:
        from engine.planning.plan import compare_with_run

        _, rows = compare_with_run(root)
    except Exception as exc:  # the report shows what it has; the plan is one part of it
        log.warning("report: no plan beside the stage times (%s: %s)", exc.__class__.__name__, exc)
        return {}
    return {(r["severity"], r["method"], r["stage"]): r["predicted_seconds"] for r in rows}


def timings_section(root: RunPath) -> str:
    path = root / "stage_seconds.json"
    if not storage.exists(path) or not _inside_run(path, root):
        return ""
    seconds = read_json(path)
    predicted = _predicted_seconds(root)
    body = []
    for severity, methods in seconds.items():
        for method, stages in methods.items():
            for stage in in_run_order(stages):
                shared = "" if stage == "cluster" else method
                guess = predicted.get((severity, shared, stage))
                body.append(
                    f"<tr><td>{_escape(severity)}</td><td>{_escape(method)}</td><td>{_escape(stage)}</td>"
                    f"<td class=\"num\">{stages[stage]:.1f}</td>"
                    f"<td class=\"num\">{'-' if guess is None else f'{guess:.1f}'}</td></tr>"
                )
    note = ("<p class=\"note\">Measured wall seconds per stage; predicted: the planner's FLOP count over "
            "this machine's measured peak (<code>jobs/plan.py --compare RUN</code>). The shared "
            "cluster stage repeats in every method's row.</p>")
    return ("<h2>Stage timings</h2>" + note
            + _table(["Severity", "Method", "Stage", "Measured (s)", "Predicted (s)"], body))


def config_section(root: RunPath) -> str:
    path = root / "config.yaml"
    if not storage.exists(path) or not _inside_run(path, root):
        return ""
    return f"<h2>Resolved config</h2><pre>{_escape(path.read_text())}</pre>"


def render_html_report(run_root) -> str:
    root = storage.as_path(run_root)
    if not _inside_run(root / "results.json", root):
        raise FairsynthError(f"{root / 'results.json'} is not a regular file inside the run directory; "
                             "re-run the job to write it")
    rows = read_json(root / "results.json")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [results_section(rows), plots_section(root), grids_section(root),
                timings_section(root), config_section(root)]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>fairsynth report: {_escape(root.name)}</title><style>{STYLE}</style></head><body>"
            f"<h1>fairsynth report: {_escape(root.name)}</h1><p class=\"note\">Run directory "
            f"<code>{_escape(root)}</code>, report written {stamp}.</p>"
            + "".join(sections) + "</body></html>")


def write_html_report(run_root) -> RunPath:
    """Write ``RUN/report.html`` from the run directory; returns its path."""
    path = storage.as_path(run_root) / REPORT_NAME
    atomic_write_text(path, render_html_report(run_root))
    return path
