"""The results of a whole job: a table laid out like the paper's, a JSON row per method and
severity, and per-group accuracy plots."""

from __future__ import annotations

import math
from pathlib import Path

from engine import storage
from engine.config import GENERATIVE_METHODS, METHODS
from engine.runs import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

METHOD_TITLES = {
    "erm": "ERM",
    "group_dro": "Group-DRO",
    "vanilla": "Vanilla SD",
    "lora": "LoRA",
    "dreambooth": "DreamBooth",
    "clustered_dreambooth": "Clustered DreamBooth",
}


def severity_tag(severity: float | str) -> str:
    """Folder name of one severity's run inside a job's run directory."""
    return f"severity-{severity}"


def severity_title(severity: float | str) -> str:
    return "orig" if severity == "original" else str(severity)


def collect_rows(run_root: Path, severities: list, methods: list[str], stage_seconds: dict) -> list[dict]:
    """One row per (method, severity) from each run's train/<method>/metrics.json."""
    rows = []
    for severity in severities:
        sub = storage.as_path(run_root) / severity_tag(severity)
        for method in methods:
            metrics = read_json(sub / "train" / method / "metrics.json")
            test = metrics["test"]
            rows.append(
                {
                    "method": method,
                    "severity": severity,
                    "test_worst_group": test["worst_group"],
                    "test_average_group": test["average_group"],
                    "test_per_group": test["per_group"],
                    "val_worst_group": metrics["val"]["worst_group"],
                    "synthetic_images": metrics.get("synthetic_images", 0),
                    "group_names": metrics.get("group_names"),
                    "synthetic_fidelity": read_fidelity(sub, method),
                    "stage_seconds": stage_seconds.get(str(severity), {}).get(method, {}),
                }
            )
    return rows


def read_fidelity(run_root, method: str) -> dict | None:
    """A generative method's synthetic group fidelity, as its filter stage measured it
    (engine.generate.fidelity); None for other methods and for runs filtered before it existed."""
    path = storage.as_path(run_root) / "filter" / method / "summary.json"
    if method not in GENERATIVE_METHODS or not storage.exists(path):
        return None
    return read_json(path).get("fidelity")


def _fidelity_cell(fidelity: dict | None) -> str:
    """'kept (all), worst unit kept' in percent: the share read as the unit's group after and
    before filtering, and the lowest unit's share after."""
    if not fidelity:
        return "-"
    worst = fidelity.get("worst_unit_after")
    tail = f", worst unit {_pct(worst['after'])}" if worst else ""
    return f"{_pct(fidelity['after'])} ({_pct(fidelity['before'])}){tail}"


def fidelity_markdown(rows: list[dict]) -> str:
    """Per unit: the share of its kept (all) synthetic images the judge reads as its group."""
    measured = [r for r in rows if r.get("synthetic_fidelity")]
    if not measured:
        return ""
    judges = sorted({r["synthetic_fidelity"]["judge"] for r in measured})
    lines = [
        f"Synthetic group fidelity per unit (%): images the {' / '.join(judges)} judge reads as the unit's "
        "class and attribute, kept by the filter (all generated); class and attribute alone, kept",
        "",
        "| Method | Severity | Unit | Group | Group fidelity | Class | Attribute | Kept / generated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in measured:
        for unit, u in r["synthetic_fidelity"]["per_unit"].items():
            lines.append(
                f"| {METHOD_TITLES[r['method']]} | {severity_title(r['severity'])} | {unit} | {u['name']} | "
                f"{_pct(u['after'])} ({_pct(u['before'])}) | {_pct(u['class_after'])} | "
                f"{_pct(u['attribute_after'])} | {u['kept']} / {u['images']} |"
            )
    return "\n".join(lines) + "\n"


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def results_markdown(rows: list[dict], title: str) -> str:
    """Methods as rows, severities as columns, 'WGA / AGA' in percent, as in the paper."""
    severities = list(dict.fromkeys(r["severity"] for r in rows))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    by_key = {(r["method"], r["severity"]): r for r in rows}
    head = (
        "| Method | " + " | ".join(f"{title} {severity_title(s)}" for s in severities)
        + " | " + " | ".join(f"group fidelity {severity_title(s)}" for s in severities) + " | synthetic images |"
    )
    lines = [
        "Test worst-group / average-group accuracy (%); group fidelity: the share of kept (all generated) "
        "synthetic images that an independent judge reads as their unit's group, and the lowest unit's (%)",
        "",
        head,
        "|---" * (2 * len(severities) + 2) + "|",
    ]
    for method in methods:
        cells = []
        for s in severities:
            r = by_key.get((method, s))
            cells.append(f"{_pct(r['test_worst_group'])} / {_pct(r['test_average_group'])}" if r else "-")
        for s in severities:
            r = by_key.get((method, s))
            cells.append(_fidelity_cell(r.get("synthetic_fidelity")) if r else "-")
        used = max(by_key[(method, s)]["synthetic_images"] for s in severities if (method, s) in by_key)
        lines.append(f"| {METHOD_TITLES[method]} | " + " | ".join(cells) + f" | {used} |")
    units = fidelity_markdown(rows)
    return "\n".join(lines) + "\n" + (f"\n{units}" if units else "")


def plot_per_group(rows: list[dict], path: Path, severity) -> None:
    """Grouped bars: test accuracy of each group, one colour per method."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    chosen = [r for r in rows if r["severity"] == severity]
    if not chosen:
        return
    n_groups = len(chosen[0]["test_per_group"])
    names = chosen[0].get("group_names") or [f"group {g}" for g in range(n_groups)]
    width = 0.8 / len(chosen)
    fig, ax = plt.subplots(figsize=(max(7, 1.8 * n_groups), 4.0), dpi=110)
    x = np.arange(n_groups)
    for i, r in enumerate(chosen):
        values = [0 if (v is None or math.isnan(v)) else 100 * v for v in r["test_per_group"]]
        ax.bar(x + (i - (len(chosen) - 1) / 2) * width, values, width, label=METHOD_TITLES[r["method"]])
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Per-group test accuracy, severity {severity_title(severity)}")
    ax.legend(fontsize=7, ncol=len(chosen), loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def write_results(run_root: Path, rows: list[dict], dataset_title: str) -> str:
    run_root = storage.as_path(run_root)
    atomic_write_json(run_root / "results.json", rows)
    table = results_markdown(rows, dataset_title)
    atomic_write_text(run_root / "results.md", table)
    for severity in dict.fromkeys(r["severity"] for r in rows):
        plot_per_group(rows, run_root / "plots" / f"per_group_{severity_tag(severity)}.png", severity)
    return table
