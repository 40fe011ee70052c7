"""What two prompt and model choices do to synthetic group fidelity on the built-in benchmark,
judged by the renderer (engine/stages/generate/fidelity.py), same seeds throughout:

1. Where the DreamBooth identifier sits in the prompt, drawn by the base model: the tiny model
   reads its words by position, so a token before the class word moves every word after it.
2. How much of its lender's fine-tuning a borrowed minority unit draws with
   (``generate.borrowed_strength``), for the units of a finished run's finetune stage.
3. Whether a unit drawing with its own fine-tuned model contrasts with the groups it is not
   (``generate.own_negative_prompt_template``): no negative prompt against the template (the
   config default's where the run's is empty), for the same run's units.

    python benchmarks/research/borrowed_fidelity.py              # the default run's units (runs/default/severity-0.999)
    python benchmarks/research/borrowed_fidelity.py --run-dir RUN --strengths 1,0.7,0.5 --methods lora

Prints three markdown tables, then, as the last line, one JSON object (value: the lowest
borrowed unit's group fidelity at the run's own ``generate.borrowed_strength``; also the
lowest own unit's with and without its negative prompt).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

IDENTIFIER_TEMPLATES = (
    "a photo of a {class_name} on {attribute_name}",
    "a photo of a {identifier} {class_name} on {attribute_name}",
    "a photo of a {class_name} on {attribute_name} {identifier}",
)


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_strengths(text: str) -> list[float]:
    try:
        strengths = [float(s) for s in text.split(",")]
    except ValueError:
        fail(f"--strengths {text!r} is not a comma-separated list of numbers, e.g. 1,0.7,0.5")
    if not strengths or any(not 0.0 <= s <= 1.0 for s in strengths):
        fail(f"--strengths {text!r}: every strength must lie in [0, 1]")
    return strengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "default" / "severity-0.999"),
                        help="a severity folder of a finished run (default: the default run's)")
    parser.add_argument("--methods", default="lora,dreambooth,clustered_dreambooth")
    parser.add_argument("--strengths", default="1,0.7,0.5")
    parser.add_argument("--images", type=int, default=48, help="images per unit and setting")
    args = parser.parse_args()
    strengths = parse_strengths(args.strengths)
    if args.images < 1:
        fail(f"--images {args.images}: draw at least 1 image per unit and setting")

    import numpy as np

    from engine.config import load_config
    from engine.errors import FairsynthError
    from engine.models.loading import load_base_pipeline
    from engine.stages.data.builtin import ATTRIBUTE_NAMES, CLASS_NAMES
    from engine.stages.generate.fidelity import read_renderer_image
    from engine.stages.generate.plan import drawing_model
    from engine.stages.generate.sampler import UnitModels, make_scheduler, sample_images

    run = Path(args.run_dir)
    if not (run / "config.yaml").is_file():
        fail(f"{run / 'config.yaml'} not found; run `python jobs/full.py` first, or pass "
             "a finished run's severity folder with --run-dir")
    try:
        cfg = load_config(str(run / "config.yaml"))
    except FairsynthError as e:
        fail(str(e))
    if cfg.data.name != "builtin":
        fail(f"the renderer judge reads the built-in benchmark only; {run} holds {cfg.data.name}")
    gen = cfg.generate
    # A run written before the setting existed drew its borrowed units at full strength; its
    # config.yaml has no key, and the config's default would misreport it.
    written = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("generate", {})
    if "borrowed_strength" not in written:
        gen = gen.model_copy(update={"borrowed_strength": 1.0})
    if gen.borrowed_strength not in strengths:  # the run's own setting is always measured
        strengths.append(gen.borrowed_strength)

    def method_models() -> tuple:
        """A base pipeline of one method's, as in the generate stage: a DreamBooth unit's
        weight changes apply to the base UNet's own weights, not to one holding LoRA adapters."""
        pipe = load_base_pipeline(cfg.model.base, "cpu", cfg.model.attention, cfg.model.allow_pickle)
        return pipe, make_scheduler(gen.scheduler, pipe.scheduler.config), UnitModels(
            pipe, run, cfg.model.attention, cfg.model.allow_pickle)

    def fidelity(models: tuple, model: dict, strength: float, prompt: str, negative: str, group: int) -> float:
        pipe, scheduler, units = models
        try:
            unet, prompts = units.activate(model["artifact"], model["artifact_kind"], strength)
        except FairsynthError as e:
            fail(str(e))
        n = args.images
        images = sample_images(unet, pipe.vae, scheduler, prompts, [prompt] * n, [negative] * n,
                               list(range(5000, 5000 + n)), gen.steps, gen.guidance_scale)
        readings = [read_renderer_image(image) for image in images]
        return float(np.mean([label * len(ATTRIBUTE_NAMES) + attribute == group for label, attribute in readings]))

    groups = [(label, attribute) for label in range(len(CLASS_NAMES)) for attribute in range(len(ATTRIBUTE_NAMES))]
    base, placements = method_models(), {}
    print("| base model, prompt | " + " | ".join(f"{CLASS_NAMES[c]} / {ATTRIBUTE_NAMES[a]}" for c, a in groups) + " |")
    print("|---|" + "---|" * len(groups))
    for template in IDENTIFIER_TEMPLATES:
        placements[template] = [fidelity(base, {"artifact": "", "artifact_kind": "base"}, 1.0, template.format(
            class_name=CLASS_NAMES[c], attribute_name=ATTRIBUTE_NAMES[a], identifier=cfg.finetune.identifier),
            "", g) for g, (c, a) in enumerate(groups)]
        print(f"| `{template}` | " + " | ".join(f"{100 * s:.0f}" for s in placements[template]) + " |")

    template, own_negative = own_negative_prompts(cfg, run)
    print("\n| method | borrowed unit | lender | " + " | ".join(f"strength {s:g}" for s in strengths) + " |")
    print("|---|---|---|" + "---|" * len(strengths))
    rows, own_rows = [], []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        path = run / "finetune" / method / "manifest.json"
        if not path.is_file():
            fail(f"{path} not found; run the finetune stage for {method} first")
        units = json.loads(path.read_text())["units"]
        by_id, models = {u["unit"]: u for u in units}, method_models()
        for unit in units:
            model, _ = drawing_model(unit, by_id, 1.0)  # the lender; drawn below at each strength
            if not model["artifact"]:
                continue
            group = int(unit["group"])
            if not unit.get("borrowed_from"):  # drawn with its own model: without and with its negative
                shares = [fidelity(models, model, 1.0, unit["prompt"], text, group) for text in ("", own_negative(group))]
                own_rows.append({"method": method, "unit": unit["unit"], "no_negative": shares[0], "negative": shares[1]})
                continue
            shares = {s: fidelity(models, model, s, unit["prompt"], unit["negative_prompt"], group) for s in strengths}
            rows.append({"method": method, "unit": unit["unit"], "lender": unit["borrowed_from"], "fidelity": shares})
            print(f"| {method} | {unit['unit']} | {unit['borrowed_from']} | "
                  + " | ".join(f"{100 * shares[s]:.0f}" for s in strengths) + " |")
    print(f"\n| method | own unit | no negative prompt | `{template}` |\n|---|---|---|---|")
    for r in own_rows:
        print(f"| {r['method']} | {r['unit']} | {100 * r['no_negative']:.0f} | {100 * r['negative']:.0f} |")
    borrowed = [r["fidelity"][gen.borrowed_strength] for r in rows]
    print(json.dumps({
        "benchmark": "borrowed_fidelity", "metric": "worst_borrowed_unit_group_fidelity",
        "value": round(min(borrowed), 4) if borrowed else None, "target": 0.9, "device": "cpu",
        "borrowed_strength": gen.borrowed_strength, "images_per_setting": args.images,
        "guidance_scale": gen.guidance_scale, "identifier_placements": placements,
        "rows": [{**r, "fidelity": {str(k): v for k, v in r["fidelity"].items()}} for r in rows],
        "own_negative_prompt_template": template, "own_units": own_rows,
        "worst_own_unit": {k: round(min(r[k] for r in own_rows), 4) if own_rows else None
                           for k in ("no_negative", "negative")},
    }))


def own_negative_prompts(cfg, run: Path):
    """The template an own unit's negative prompt is measured with (the run's, or the config
    default's where the run's is empty), and group -> that prompt, filled as the finetune stage
    fills it (engine.stages.finetune.units.PromptBook)."""
    from engine.config import GenerateConfig
    from engine.errors import FairsynthError
    from engine.runs import RunDir
    from engine.stages.data.stage import load_run_dataset
    from engine.stages.finetune.units import PromptBook

    template = cfg.generate.own_negative_prompt_template or GenerateConfig.model_fields["own_negative_prompt_template"].default
    generate = cfg.generate.model_copy(update={"own_negative_prompt_template": template})
    try:
        dataset = load_run_dataset(RunDir(run))
        book = PromptBook(cfg.model_copy(update={"generate": generate}), dataset)
        book.own_negative(0, 0)  # a template that cannot be filled fails here, in one line
    except FairsynthError as e:
        fail(str(e))
    return template, lambda group: book.own_negative(*divmod(group, dataset.n_attributes))


if __name__ == "__main__":
    main()
