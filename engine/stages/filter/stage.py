"""The filter stage (PAPER.md step 4): score every synthetic image, keep the top share per group.

score = alpha * sim(image, class prompt) + (1 - alpha) * sim(image, group centroid), where
sim is the cosine similarity of image-text encoder embeddings, the class prompt is
``filter.class_prompt_template`` (the paper's: the class alone; a template that also names
``{attribute_name}`` scores each image against its whole group) and the group centroid is the mean embedding of the group's
real training images (``RUN/cluster/group_means.npy``). A group with no real training image
has no centroid; its images are ranked by the class-prompt term alone. Real runs use CLIP
(``model.encoder``); the tiny default uses the shipped offline tiny encoder, which sees the
same 32 px images, so its scores rank images by the same rule at a smaller scale.

Scoring is a Ray Data pass (``read_parquet`` -> ``map_batches(SyntheticImageScorer)``), the
ranking happens on the driver (one float per image), and each shard is then rewritten
atomically with its ``score`` and ``kept`` columns, and the set's dataset card
(``RUN/synthetic/<method>/README.md``) gets the keep rate and fidelity. ``RUN/filter/<method>/summary.json``
records per-group counts and mean scores of kept and dropped images, and the synthetic group
fidelity per unit before and after filtering (engine.stages.generate.fidelity; its judge reads each
image in the same scoring pass).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pandas as pd
import pyarrow as pa

from engine import storage
from engine.cards import write_dataset_card
from engine.config import Config
from engine.errors import FairsynthError
from engine.runs import RunDir, atomic_write_json, read_json
from engine.stages import stage_key
from engine.stages.data.stage import load_run_dataset
from engine.stages.generate import fidelity
from engine.stages.generate.shards import (
    decode_png,
    read_shard,
    remove_partial_shards,
    shard_paths,
    shard_row_counts,
    synthetic_dir,
    write_shard_table,
)

log = logging.getLogger(__name__)

# A rewrite task only reads and writes one Parquet shard.
REWRITE_NUM_CPUS = 0.25


def filter_stage_name(method: str) -> str:
    return f"filter/{method}"


def keep_count(n: int, keep_fraction: float) -> int:
    """Images a group of ``n`` keeps: ``keep_fraction`` of them rounded half up, at least one."""
    if n == 0:
        return 0
    return min(n, max(1, math.floor(keep_fraction * n + 0.5)))


def select_top_fraction(scores: pd.DataFrame, keep_fraction: float) -> pd.Series:
    """``kept`` per row: the best ``keep_fraction`` of each group by score (ties by unit, seed)."""
    ranked = scores.sort_values(["group", "score", "unit", "seed"], ascending=[True, False, True, True])
    position = ranked.groupby("group").cumcount()
    sizes = ranked.groupby("group")["group"].transform("size")
    quota = sizes.map(lambda n: keep_count(int(n), keep_fraction))
    return (position < quota).reindex(scores.index)


def load_group_means(run: RunDir, n_groups: int) -> np.ndarray:
    """Unit-length real-image centroids per group; NaN rows for groups with no real image."""
    path = run / "cluster" / "group_means.npy"
    if not path.exists():
        raise FairsynthError(
            f"missing {path}: run `python jobs/cluster.py --run-dir {run.root}` before filtering"
        )
    means = storage.load_numpy(path).astype(np.float32)
    if means.ndim != 2 or means.shape[0] != n_groups:
        raise FairsynthError(
            f"{path} has shape {means.shape}, expected ({n_groups}, d); re-run the cluster stage"
        )
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return means / norms


class SyntheticImageScorer:
    """Ray Data actor: PNG rows in, (unit, seed, group, score, two similarities) out, plus
    the fidelity judge's reading (judged_label, judged_attribute) when one is given."""

    def __init__(self, encoder: str, model_device: str, num_gpus: float, image_size: int,
                 group_prompts: list[str], group_means: np.ndarray, alpha: float,
                 judge: str | None = None, judge_prompts: tuple[list[str], list[str]] | None = None):
        from engine.models.encoders import load_encoder
        from engine.raylib import device_for

        self.encoder = load_encoder(encoder, device=device_for(num_gpus, model_device))
        if group_means.shape[1] != self.encoder.dim:
            raise FairsynthError(
                f"RUN/cluster/group_means.npy has {group_means.shape[1]}-d embeddings but encoder "
                f"{encoder!r} makes {self.encoder.dim}-d ones; re-run the cluster stage with model.encoder={encoder}"
            )
        # The side the cluster stage embedded real images at, so both live in one space.
        self.image_size = int(getattr(self.encoder, "image_size", None) or image_size)
        # One prompt per group (a class prompt repeats across its groups unless the template
        # names the attribute too).
        if len(group_prompts) != group_means.shape[0]:
            raise FairsynthError(
                f"the filter has {len(group_prompts)} prompts for {group_means.shape[0]} groups; "
                "pass one prompt per group (engine.stages.filter.stage.filter_prompts makes them)"
            )
        self.prompt_embeddings = np.asarray(self.encoder.encode_texts(group_prompts), dtype=np.float32)
        self.group_means = group_means
        self.alpha = alpha
        self.judge = None if judge is None else fidelity.make_judge(judge, self.encoder, judge_prompts)

    def _judge(self, batch: pd.DataFrame, embeddings: np.ndarray) -> dict:
        if self.judge is None:
            return {}
        if isinstance(self.judge, fidelity.ClipJudge):
            labels, attributes = self.judge.read_embeddings(embeddings)
        else:  # the renderer's rules read the image as it was drawn, at its own size
            labels, attributes = self.judge.read([decode_png(b) for b in batch["image"]])
        return {"judged_label": labels, "judged_attribute": attributes}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        images = np.stack([decode_png(b, self.image_size) for b in batch["image"]])
        embeddings = np.asarray(self.encoder.encode_images(images), dtype=np.float32)
        groups = batch["group"].to_numpy()
        sim_class = np.einsum("nd,nd->n", embeddings, self.prompt_embeddings[groups])
        sim_centroid = np.einsum("nd,nd->n", embeddings, self.group_means[groups])
        has_centroid = np.isfinite(sim_centroid)
        score = np.where(
            has_centroid,
            self.alpha * sim_class + (1 - self.alpha) * np.nan_to_num(sim_centroid),
            sim_class,
        )
        return pd.DataFrame({
            "unit": batch["unit"].to_numpy(),
            "seed": batch["seed"].to_numpy(),
            "group": groups,
            "score": score.astype(np.float64),
            "sim_class": sim_class.astype(np.float64),
            "sim_centroid": sim_centroid.astype(np.float64),
            **self._judge(batch, embeddings),
        })


def filter_prompts(template: str, dataset) -> list[str]:
    """The filter's text prompt for each group, in group order: the template with the group's
    class word and, where the template names it, its attribute word."""
    return [template.format(class_name=dataset.class_names[g // dataset.n_attributes],
                            attribute_name=dataset.attribute_names[g % dataset.n_attributes])
            for g in range(dataset.n_groups)]


def score_images(cfg: Config, run: RunDir, method: str, group_prompts: list[str],
                 group_means: np.ndarray, judge: str | None = None,
                 judge_prompts: tuple[list[str], list[str]] | None = None) -> pd.DataFrame:
    """One row per synthetic image: unit, seed, group, score, sim_class, sim_centroid (and,
    with a judge, judged_label and judged_attribute)."""
    from ray.data import DataContext

    from engine.raylib import init_ray, retry_node_loss
    from engine.resources import actor_resources

    init_ray(cfg.ray)
    flt = cfg.filter
    paths = shard_paths(run, method)
    images = sum(shard_row_counts(paths).values())
    resources = actor_resources(cfg, "filter", work=math.ceil(images / flt.batch_size))
    log.info("filter %s: scoring %d images (%s)", method, images, resources.describe())
    context = DataContext.get_current()
    saved = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        return retry_node_loss(f"filter {method}", _score_pass, paths, images, f"filter {method}", {
            "encoder": cfg.model.encoder,
            "model_device": cfg.model.device,
            "num_gpus": resources.num_gpus,
            "image_size": cfg.data.image_size,
            "group_prompts": group_prompts,
            "group_means": group_means,
            "alpha": flt.alpha,
            "judge": judge,
            "judge_prompts": judge_prompts,
        }, resources.map_batches_kwargs())
    finally:
        context.enable_progress_bars = saved


def _score_pass(paths: list, images: int, desc: str, scorer_kwargs: dict, map_kwargs: dict) -> pd.DataFrame:
    """One Ray Data pass over the shards: read, score, collect."""
    import ray

    ds = ray.data.read_parquet(**storage.dataset_source(paths))
    ds = ds.select_columns(["image", "unit", "seed", "group"])
    ds = ds.map_batches(SyntheticImageScorer, fn_constructor_kwargs=scorer_kwargs, batch_format="pandas", **map_kwargs)
    return _collect_scores(ds, images, desc)


def _collect_scores(ds, images: int, desc: str) -> pd.DataFrame:
    """The scored rows, in the dataset's order, with one progress bar over images scored."""
    from tqdm.auto import tqdm

    frames = []
    with tqdm(total=images, unit="img", desc=desc, smoothing=0.1) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            frames.append(batch)
            bar.update(len(batch))
    return pd.concat(frames, ignore_index=True) if frames else ds.to_pandas()


def _rewrite_shard(uri: str, lookup: pd.DataFrame) -> int:
    """Ray task: store score and kept in one shard if its values changed; 1 when rewritten.
    It gets the shard's URI (or shared-mount path), so it runs on any node."""
    path = storage.as_path(uri)
    frame = read_shard(path)
    keys = pd.MultiIndex.from_arrays([frame["unit"], frame["seed"]])
    new = lookup.reindex(keys)
    if new["score"].isna().any():
        raise FairsynthError(f"shard {path} holds images the filter did not score; re-run generate")
    same = np.allclose(frame["score"].to_numpy(), new["score"].to_numpy(), equal_nan=False) and (
        frame["kept"].to_numpy() == new["kept"].to_numpy()
    ).all()
    if same:
        return 0
    frame["score"] = new["score"].to_numpy()
    frame["kept"] = new["kept"].to_numpy().astype(bool)
    write_shard_table(path, pa.Table.from_pandas(frame, preserve_index=False))
    return 1


def _rewrite_shards(run: RunDir, method: str, decided: pd.DataFrame) -> int:
    """Store score and kept in every shard whose values changed (Ray tasks, one per shard,
    reading and writing the run's storage); returns shards rewritten."""
    import ray

    lookup = ray.put(decided.set_index(["unit", "seed"])[["score", "kept"]])
    task = ray.remote(num_cpus=REWRITE_NUM_CPUS)(_rewrite_shard)
    refs = [task.remote(storage.uri(path), lookup) for path in shard_paths(run, method)]
    try:
        return int(sum(ray.get(refs)))
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, FairsynthError):
            raise FairsynthError(str(err.cause)) from None
        raise


def run_filter_stage(cfg: Config, run: RunDir, method: str) -> dict:
    """Score and mark ``kept`` in ``RUN/synthetic/<method>``; write ``RUN/filter/<method>/summary.json``.

    Skipped when complete for the same generated set, filter settings and encoder.
    """
    from engine.stages.cluster.stage import embeddings_hash
    from engine.stages.generate.grids import write_sample_grid
    from engine.stages.generate.stage import generate_stage_name

    generated = run.read_marker(generate_stage_name(method))
    if generated is None:
        raise FairsynthError(
            f"no finished synthetic set in {synthetic_dir(run, method)}; run "
            f"`python jobs/generate.py --method {method} --run-dir {run.root}` first"
        )
    stage = filter_stage_name(method)
    # What picks the kept images, and so what a classifier trained on them depends on (the
    # train stage reads it from the marker); the judge only reports on them.
    kept_hash = stage_key(cfg, "filter", generate=generated["hash"], embeddings=embeddings_hash(cfg))
    stage_hash = stage_key(cfg, "fidelity", filter=kept_hash)
    summary_path = run / stage / "summary.json"
    if run.is_complete(stage, stage_hash) and summary_path.exists():
        log.info("filter %s: complete, skipped", method)
        return read_json(summary_path)
    # Shards are rewritten one by one below: until the new marker, no old one vouches for them.
    run.clear_marker(stage)

    started = time.perf_counter()
    dataset = load_run_dataset(run)
    group_means = load_group_means(run, dataset.n_groups)
    group_prompts = filter_prompts(cfg.filter.class_prompt_template, dataset)
    judge = fidelity.judge_kind(cfg)
    judge_prompts = fidelity.judge_prompts(cfg, dataset.class_names, dataset.attribute_names)
    scores = score_images(cfg, run, method, group_prompts, group_means, judge, judge_prompts)
    if scores.duplicated(["unit", "seed"]).any():
        raise FairsynthError(f"{synthetic_dir(run, method)} holds a (unit, seed) twice; delete it and re-run generate")
    scores["kept"] = select_top_fraction(scores, cfg.filter.keep_fraction)
    rewritten = _rewrite_shards(run, method, scores)
    remove_partial_shards(synthetic_dir(run, method))  # a rewrite on a lost node leaves one
    write_sample_grid(run, method)
    group_names = [dataset.group_name(g) for g in range(dataset.n_groups)]
    synthetic_fidelity = fidelity.group_fidelity(scores, dataset.n_attributes, group_names, judge)
    log.info(
        "filter %s: group fidelity (%s judge) %.3f of all images, %.3f of kept ones; worst unit after filtering: %s",
        method, judge, synthetic_fidelity["before"], synthetic_fidelity["after"], synthetic_fidelity["worst_unit_after"],
    )

    per_group = {}
    for group, part in scores.groupby("group"):
        kept, dropped = part[part["kept"]], part[~part["kept"]]
        per_group[str(int(group))] = {
            "name": dataset.group_name(int(group)),
            "images": int(len(part)),
            "kept": int(len(kept)),
            "has_centroid": bool(np.isfinite(group_means[int(group)]).all()),
            "mean_score_kept": float(kept["score"].mean()) if len(kept) else None,
            "mean_score_dropped": float(dropped["score"].mean()) if len(dropped) else None,
            "mean_sim_class": float(part["sim_class"].mean()),
            "mean_sim_centroid": float(part["sim_centroid"].mean()) if part["sim_centroid"].notna().any() else None,
        }
    summary = {
        "method": method,
        "encoder": cfg.model.encoder,
        "alpha": cfg.filter.alpha,
        "keep_fraction": cfg.filter.keep_fraction,
        "class_prompts": list(dict.fromkeys(group_prompts)),
        "group_prompts": group_prompts,
        "images": int(len(scores)),
        "kept": int(scores["kept"].sum()),
        "per_group": per_group,
        "fidelity": synthetic_fidelity,
        "shards_rewritten": rewritten,
        "stage_seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_json(summary_path, summary)
    write_dataset_card(run, method, summary)
    run.mark_complete(stage, stage_hash, kept=summary["kept"], kept_hash=kept_hash)
    return summary
