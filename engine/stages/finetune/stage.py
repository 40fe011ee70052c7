"""The fine-tune stage: plan a method's units, train the ones that need it as Ray Tune
trials, and write the manifest the generate stage reads.

Owns ``RUN/finetune/``:

- ``<method>/manifest.json``: the method, the base model and one entry per unit (unit id,
  group, cluster, label, attribute, n_real, artifact (relative to RUN; null = the base
  model), artifact_kind (an artifact kind of engine/generation_methods.py), prompt, negative_prompt,
  borrowed_from, steps, final_loss). A borrowing unit carries its lender's artifact, steps
  and loss.
- ``<method>/units/<unit>/``: a trained unit's artifact (a diffusers LoRA folder; for full
  DreamBooth ``unet_delta.safetensors`` (and ``text_encoder_delta.safetensors``), each
  layer's change at rank ``finetune.delta_rank`` (engine/stages/finetune/delta.py), or with
  ``dreambooth_store: unet`` a partial pipeline folder with ``unet/`` and ``text_encoder/``) and
  ``unit.json`` (the hashes it was trained under, steps, loss) and ``README.md``, its model card
  (engine/cards.py: base model, prompts, group, training settings; no hash covers it). Written in one rename, so a
  unit folder is complete or absent; a unit whose hashes match is not trained again.
- ``<method>/tune/``: the Ray Tune experiments (trial checkpoints), unless
  ``ray.storage_path`` puts them on shared storage. An experiment is deleted once the
  manifest lists every unit it trained (their artifacts are in ``units/`` by then), so a
  finished method keeps no second copy; a unit folder lost after that is trained again.
- ``<method>/tensorboard/<unit>/``: the TensorBoard events of the unit's chosen trial (its
  loss and learning rate per step), kept when the experiment is deleted, so one
  ``tensorboard --logdir RUN`` shows fine-tuning beside training.
- ``class_images/<key>.npy``: prior-preservation images the base model drew, keyed by the
  prompt, the base model and the sampler settings, shared by every DreamBooth method.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from engine import storage
from engine.cards import CARD_FILE, unit_card
from engine.config import Config
from engine.errors import FairsynthError
from engine.generation_methods import BASE, GenerationMethod, get_method
from engine.hashing import digest
from engine.resources import trial_bundle
from engine.runs import RunDir, atomic_directory, atomic_write_json, read_json
from engine.stages import stage_fields, stage_key
from engine.stages.data.stage import data_hash, run_data_stage
from engine.stages.finetune.trainer import UnitJob, unit_seed
from engine.stages.finetune.tune import UnitResult, run_unit_trials
from engine.stages.finetune.units import Unit

log = logging.getLogger(__name__)

UNIT_FILE = "unit.json"


def stage_name(method: str) -> str:
    return f"finetune/{method}"


def manifest_path(run: RunDir, method: str) -> Path:
    return run / f"finetune/{method}/manifest.json"


def load_manifest(run: RunDir, method: str) -> dict:
    return read_json(manifest_path(run, method))


def _sampled_fingerprint(path: Path, sample: int = 1 << 20) -> tuple[int, str]:
    """A file's size and a hash of its first and last MiB: re-trained weights change both,
    while a copy, a fresh clone or a new node's checkout (new file times) changes neither."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(sample)
        if size > 2 * sample:
            f.seek(size - sample)
        return size, digest(head + f.read(sample))


def model_fingerprint(cfg: Config) -> str:
    """The base model's identity: its files' sizes and sampled contents for a local folder,
    else its name, so re-trained weights at the same path make trained units stale."""
    base = cfg.model.base
    if base == "tiny":
        from engine.models.tiny import tiny_model_path

        folder = tiny_model_path()
    else:
        folder = Path(base)
    if not folder.is_dir():
        return base
    files = sorted(
        (str(p.relative_to(folder)), *_sampled_fingerprint(p))
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".txt")
    )
    return f"{base}:{digest(files)}"


def training_hash(cfg: Config, strategy: GenerationMethod) -> str:
    """What a trained unit of ``strategy`` depends on, besides its own images and prompts
    (``Unit.training_hash``)."""
    prior = class_image_key(cfg) if strategy.uses_prior(cfg.finetune) else None
    return stage_key(cfg, "unit_training", method=strategy.name, model=model_fingerprint(cfg), class_images=prior)


def unit_plan_hash(cfg: Config, strategy: GenerationMethod) -> str:
    """What a method's units, their images and prompts depend on."""
    cluster = None
    if strategy.per_cluster:
        from engine.stages.cluster.stage import cluster_hash

        cluster = cluster_hash(cfg)
    return stage_key(cfg, "unit_plan", method=strategy.name, data=data_hash(cfg), cluster=cluster)


def stage_hash(cfg: Config, strategy: GenerationMethod) -> str:
    return stage_key(cfg, "finetune", method=strategy.name, unit_plan=unit_plan_hash(cfg, strategy),
                     unit_training=training_hash(cfg, strategy))


def training_settings(cfg: Config) -> dict:
    """The finetune keys a trained unit depends on, by name, as its model card lists them."""
    fields, _ = stage_fields("unit_training", type(cfg))
    return {f.split(".", 1)[1]: getattr(cfg.finetune, f.split(".", 1)[1]) for f in fields if f.startswith("finetune.")}


# --- prior-preservation class images --------------------------------------------------------


def class_image_key(cfg: Config, prompt: str | None = None) -> str:
    """The key of the base model's prior-preservation images for ``prompt`` (None: of every
    prompt, as a trained unit depends on them; its own prompt is in its unit hash)."""
    return stage_key(cfg, "class_images", model=model_fingerprint(cfg), prompt=prompt)


def _draw_class_images_task(cfg: Config, prompt: str, seed: int, gpus: float, threads: int) -> np.ndarray:
    import torch

    from engine.raylib import device_for
    from engine.stages.finetune.trainer import draw_class_images

    torch.set_num_threads(max(1, threads))
    device = device_for(gpus, cfg.model.device)
    return draw_class_images(cfg.model, cfg.generate, prompt, cfg.finetune.num_class_images, seed, device)


def ensure_class_images(cfg: Config, run: RunDir, prompts: list[str]) -> dict[str, np.ndarray]:
    """uint8 class images per prompt, drawn by the base model once and cached in the run."""
    import ray

    folder = run / "finetune/class_images"
    found, missing = {}, []
    for prompt in prompts:
        path = folder / f"{class_image_key(cfg, prompt)}.npy"
        if path.exists():
            found[prompt] = storage.load_numpy(path)
        else:
            missing.append(prompt)
    if missing:
        bundle = trial_bundle(cfg.finetune, cfg.model.device)
        task = ray.remote(num_cpus=bundle.get("CPU", 1.0), num_gpus=bundle.get("GPU", 0.0))(_draw_class_images_task)
        refs = {
            p: task.remote(cfg, p, unit_seed(cfg.finetune.seed, p), bundle.get("GPU", 0.0), int(bundle.get("CPU", 1)))
            for p in missing
        }
        log.info("drawing %d prior-preservation images for each of %d class prompts", cfg.finetune.num_class_images, len(missing))
        for prompt, ref in refs.items():
            images = ray.get(ref)
            key = class_image_key(cfg, prompt)
            storage.save_numpy(folder / f"{key}.npy", images)
            atomic_write_json(folder / f"{key}.json", {"prompt": prompt, "model": model_fingerprint(cfg),
                                                        "shape": list(images.shape)})
            found[prompt] = images
    return found


# --- trained units -----------------------------------------------------------------------------


def unit_dir(run: RunDir, method: str, unit: str) -> Path:
    return run / f"finetune/{method}/units/{unit}"


def _file_fingerprint(path) -> dict:
    """Size, and a hash of what a damaged copy changes, read cheaply even from a bucket: a
    safetensors file's header (every tensor's name, type, shape and offsets), another file's
    whole content."""
    import pyarrow.fs as pafs

    fs, fs_path = storage.fs_path(path)
    with (fs or pafs.LocalFileSystem()).open_input_file(fs_path) as f:
        size = f.size()
        if path.suffix == ".safetensors":
            length = int.from_bytes(f.read(8), "little")
            data = f.read(length) if 8 + length <= size else b""
        else:
            data = f.read()
    return {"bytes": size, "sha256": digest(data)}


def artifact_fingerprint(folder) -> dict[str, dict]:
    """Every artifact file of a unit folder, by name: not unit.json, nor the model card, an
    output a user may edit."""
    outputs = (UNIT_FILE, CARD_FILE)
    return {p.name: _file_fingerprint(p) for p in sorted(folder.iterdir()) if p.name not in outputs and p.is_file()}


def artifact_problem(folder, record: dict) -> str | None:
    """What differs between a unit's artifact and the one its record was written with; None
    when it is whole."""
    written = record.get("artifact_files")
    if not isinstance(written, dict):
        return f"{UNIT_FILE} lists no artifact files"
    found = artifact_fingerprint(folder)
    for name in sorted(set(written) | set(found)):
        if name not in found:
            return f"{name} is missing"
        if name not in written:
            return f"{name} was not written with the unit"
        if found[name]["sha256"] != written[name]["sha256"]:
            if name.endswith(".safetensors"):
                return f"{name} holds other tensors (names, shapes or types) than were written"
            return f"{name} differs from the file written"
        if found[name]["bytes"] != written[name]["bytes"]:  # cut short, or grown
            return f"{name} has {found[name]['bytes']} bytes where {written[name]['bytes']} were written"
    return None


def damaged_units(run: RunDir, manifest: dict) -> list[tuple[str, str]]:
    """(unit folder, problem) for each artifact of a manifest that differs from its record."""
    damaged = []
    for artifact in sorted({u["artifact"] for u in manifest["units"] if u.get("artifact")}):
        folder = run / artifact
        try:
            problem = artifact_problem(folder, json.loads((folder / UNIT_FILE).read_text()))
        except (OSError, ValueError) as exc:
            problem = f"{UNIT_FILE} cannot be read ({type(exc).__name__})"
        if problem:
            damaged.append((str(folder), problem))
    return damaged


def _unit_record(run: RunDir, method: str, unit: Unit, train_hash: str) -> dict | None:
    """The saved record of a trained unit when it matches this config, else None."""
    path = unit_dir(run, method, unit.unit) / UNIT_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    if record.get("hash") != train_hash or record.get("unit_hash") != unit.training_hash():
        return None
    problem = artifact_problem(path.parent, record)
    if problem:
        log.warning("unit artifact %s is damaged (%s); the unit is trained again", path.parent, problem)
        return None
    return record


def _materialize(run: RunDir, method: str, unit: Unit, result: UnitResult, train_hash: str, kind: str,
                 card: Callable[[Unit, dict], str]) -> dict:
    """Copy the unit's artifact out of its trial's last checkpoint into the run, with its model
    card, in one rename."""
    from engine.stages.finetune.trainer import ARTIFACT_DIR

    record = {
        "unit": unit.unit, "hash": train_hash, "unit_hash": unit.training_hash(), "artifact_kind": kind,
        "steps": result.steps, "final_loss": result.final_loss, "learning_rate": result.learning_rate,
        "heldout_loss": result.heldout_loss, "started_at": result.started_at,
        "finished_at": result.finished_at, "resumed_at": result.resumed_at,
        # Its name under the Tune storage, not a path: a copied run then deletes its own copy.
        "experiment": result.experiment.rstrip("/").rsplit("/", 1)[-1],
    }
    target = unit_dir(run, method, unit.unit)
    with result.checkpoint.as_directory() as folder, atomic_directory(target, last=UNIT_FILE) as tmp:
        source = Path(folder) / ARTIFACT_DIR
        if not source.is_dir():
            raise FairsynthError(
                f"the last checkpoint of unit {unit.unit} holds no artifact ({folder}); delete "
                f"{run / f'finetune/{method}/tune'} and re-run"
            )
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        record["artifact_files"] = artifact_fingerprint(Path(tmp))  # checked on every later run
        (tmp / CARD_FILE).write_text(card(unit, record))
        (tmp / UNIT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    _keep_tensorboard(run, method, unit.unit, result)
    return record


def _keep_tensorboard(run: RunDir, method: str, unit: str, result: UnitResult) -> None:
    """Copy the TensorBoard events Tune wrote beside the trial's checkpoints into the run."""
    import posixpath

    import pyarrow.fs as pafs

    fs, trial_dir = result.checkpoint.filesystem, posixpath.dirname(result.checkpoint.path)
    try:
        for info in fs.get_file_info(pafs.FileSelector(trial_dir)):
            name = posixpath.basename(info.path)
            if info.type == pafs.FileType.File and name.startswith("events.out.tfevents"):
                with fs.open_input_stream(info.path) as events:
                    storage.write_bytes(run / f"finetune/{method}/tensorboard/{unit}/{name}", events.read())
    except OSError as exc:  # the curves are a convenience; the unit is what the stage owes
        log.warning("unit %s: TensorBoard events not kept (%s)", unit, exc)


def card_writer(cfg: Config, run: RunDir, strategy: GenerationMethod) -> Callable[[Unit, dict], str]:
    """The model card of a unit trained under ``cfg``, given the unit and its record."""
    groups = read_json(run / "data/groups.json")
    settings = training_settings(cfg)

    def card(unit: Unit, record: dict) -> str:
        names = f"{groups['class_names'][unit.label]} / {groups['attribute_names'][unit.attribute]}"
        return unit_card(method=strategy.name, base_model=cfg.model.base, dataset=groups["dataset"],
                         unit=asdict(unit), group_name=names, settings=settings, record=record)

    return card


def _check_devices(cfg: Config) -> None:
    import ray

    from engine.resources import check_cluster_supplies

    # model.device=cuda without a GPU share is refused when the config loads (engine/config.py).
    gpus_per_trial = trial_bundle(cfg.finetune, cfg.model.device).get("GPU", 0.0)
    if gpus_per_trial > 0:
        check_cluster_supplies(cfg)
    if gpus_per_trial == 0 and cfg.model.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0:
        log.warning("the Ray cluster has GPUs but finetune.trial_resources asks for none: trials train on CPU")


def tune_storage(cfg: Config, run: RunDir, method: str) -> str:
    """Where Tune keeps a method's experiments: the run directory unless ray.storage_path says
    otherwise; a URI (s3://...) goes to Tune as it is (Ray opens it with pyarrow.fs on every node)."""
    return (cfg.ray.storage_path or storage.uri(run / f"finetune/{method}/tune")).rstrip("/")


def train_units(cfg: Config, run: RunDir, strategy: GenerationMethod, units: list[Unit]) -> dict[str, dict]:
    """Train every unit that has no matching record yet; returns each unit's record."""
    from engine.raylib import init_ray

    method, ft = strategy.name, cfg.finetune
    train_hash = training_hash(cfg, strategy)
    records = {u.unit: _unit_record(run, method, u, train_hash) for u in units}
    pending = [u for u in units if records[u.unit] is None]
    if not pending:
        return records
    log.info("%s: training %d of %d units (%s)", method, len(pending), len(units), ", ".join(u.unit for u in pending))
    init_ray(cfg.ray)
    _check_devices(cfg)
    class_images = {}
    if strategy.uses_prior(ft):
        class_images = ensure_class_images(cfg, run, sorted({u.class_prompt for u in pending}))
    jobs = [
        UnitJob(
            method=method, unit=u.unit, sources=u.sources, train_prompt=u.train_prompt, class_prompt=u.class_prompt,
            class_images=class_images.get(u.class_prompt), model=cfg.model,
            finetune=ft, seed=unit_seed(ft.seed, u.unit),
        )
        for u in pending
    ]
    results = run_unit_trials(jobs, ft, tune_storage(cfg, run, method), prefix=f"{method}-{train_hash}", model_device=cfg.model.device)
    kind, card = strategy.artifact_kind(ft), card_writer(cfg, run, strategy)
    for unit in pending:
        records[unit.unit] = _materialize(run, method, unit, results[unit.unit], train_hash, kind, card)
    return records


# --- the stage --------------------------------------------------------------------------------


def build_manifest(cfg: Config, run: RunDir, strategy: GenerationMethod, units: list[Unit], records: dict) -> dict:
    entries = []
    by_id = {u.unit: u for u in units}
    for unit in units:
        entry = {
            "unit": unit.unit, "group": unit.group, "cluster": unit.cluster, "label": unit.label,
            "attribute": unit.attribute, "n_real": unit.n_real, "prompt": unit.prompt,
            "negative_prompt": unit.negative_prompt, "borrowed_from": unit.borrowed_from,
            "artifact": None, "artifact_kind": BASE, "steps": 0, "final_loss": None,
        }
        lender = by_id[unit.borrowed_from] if unit.borrowed_from else unit
        record = records.get(lender.unit)
        if strategy.trains and record is not None:
            entry.update(
                artifact=str(unit_dir(run, strategy.name, lender.unit).relative_to(run.root)),
                artifact_kind=record["artifact_kind"], steps=record["steps"], final_loss=record["final_loss"],
                # The hashes it was trained under: a unit re-trained at the same path into the same
                # steps and loss (a change only to how it is stored) is still a different model.
                trained_under=[record["hash"], record["unit_hash"]],
            )
        entries.append(entry)
    return {"method": strategy.name, "base_model": cfg.model.base, "units": entries}


def run_finetune_stage(cfg: Config, run: RunDir, method: str) -> dict:
    """Write ``RUN/finetune/<method>/`` (see the module docstring) and return the manifest.

    Skipped when complete for the same config; otherwise only units without a matching
    trained record are trained. Runs the data (and, for clustered DreamBooth, cluster) stage
    first when it is missing.
    """
    strategy = get_method(method)
    stage, expected = stage_name(method), stage_hash(cfg, strategy)
    if run.is_complete(stage, expected) and manifest_path(run, method).exists():
        manifest = load_manifest(run, method)
        if not damaged_units(run, manifest):
            return manifest
        # Those units are trained again below (their records no longer match).
    dataset = run_data_stage(cfg, run)
    assignments = None
    if strategy.per_cluster:
        from engine.stages.cluster.stage import run_cluster_stage

        assignments = run_cluster_stage(cfg, run)
    units = strategy.plan_units(cfg, dataset, assignments)
    records = {}
    if strategy.trains:
        records = train_units(cfg, run, strategy, [u for u in units if u.trains])
    manifest = build_manifest(cfg, run, strategy, units, records)
    atomic_write_json(manifest_path(run, method), manifest)
    run.mark_complete(stage, expected, units=len(units), trained=sum(u.trains for u in units))
    _remove_experiments(records, tune_storage(cfg, run, method))
    return manifest


def _remove_experiments(records: dict, storage_root: str) -> None:
    """Delete the Tune experiments of units the manifest now lists: each unit's artifact is in
    the run directory, so their checkpoints are a second copy."""
    from engine.stages.finetune.tune import remove_experiment

    for recorded in sorted({r["experiment"] for r in records.values() if r and r.get("experiment")}):
        experiment = experiment_under(storage_root, recorded)
        if experiment is None:
            log.warning("not deleting %r, which a unit.json names as its Tune experiment: it is not a folder "
                        "of this run's Tune storage %s", recorded, storage_root)
        elif remove_experiment(experiment):
            log.info("removed the finished fine-tuning experiment %s", experiment)


def experiment_under(storage_root: str, recorded: str) -> str | None:
    """The experiment folder a unit record names, when it is one folder directly under
    ``storage_root``; None for any other path (a tampered record, or the run this one was
    copied from), which is never deleted."""
    name = str(recorded).rstrip("/")
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        return None
    experiment = f"{storage_root}/{name}"
    if "://" not in experiment:
        # A link named like an experiment would lead the deletion out of the storage.
        real_root = Path(storage_root).resolve()
        if Path(experiment).is_symlink() or Path(experiment).resolve().parent != real_root:
            return None
    return experiment
