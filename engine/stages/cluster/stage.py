"""The cluster stage: embed every training image, then k-means within each group.

Owns ``RUN/cluster/``:

- ``embeddings.npy``: float32 [n_train, d], L2-normalised image embeddings, one row per
  training image in the order of ``assignments.parquet`` (the data stage's training order);
  ``embeddings.json`` records the encoder and the hash they were made under, so a re-run that
  only changes clustering settings reuses them.
- ``assignments.parquet``: one row per training image: image_id, group, cluster (int; every
  image of a non-empty group gets a cluster >= 0, numbered by decreasing size), distance
  (Euclidean distance to its cluster's centroid in the clustered space).
- ``centroids.npz``: key ``group_<g>`` -> float32 [k_g, d] for every group ([0, d] when empty).
- ``group_means.npy``: float32 [n_groups, d], the mean of each group's L2-normalised
  embeddings (not re-normalised); a NaN row for a group with no training images.
- ``summary.json``: clusters per group, how k was chosen and why it was capped, and the
  normalised mutual information (NMI) between clusters and the dataset's sub-types.

Embedding runs through Ray Data: an actor pool of :class:`ImageEmbedder` loads the encoder once
per actor and encodes batches of images, on a GPU when the actor is given one. Clustering is
FAISS k-means (spherical for normalised embeddings), seeded per group. With ``cluster.k =
'auto'`` each group's k is the candidate in [2, k_max] with the best silhouette after small
clusters are merged, capped so that every cluster can hold ``min_cluster_size`` images; a
group whose best silhouette stays under ``min_silhouette`` (no real structure) or that is too
small to split keeps one cluster. Clusters smaller than ``min_cluster_size`` merge into the
cluster with the nearest centroid.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from engine import storage
from engine.config import ClusterConfig, Config
from engine.errors import FairsynthError
from engine.runs import RunDir, atomic_write_bytes, atomic_write_json, read_json
from engine.stages import stage_key
from engine.stages.data.datasets import GroupedDataset, load_image
from engine.stages.data.stage import data_hash, run_data_stage

log = logging.getLogger(__name__)

STAGE = "cluster"
ASSIGNMENT_COLUMNS = ("image_id", "group", "cluster", "distance")
# Silhouette is quadratic in the number of points; a seeded sample this large estimates it
# to about two decimals, which is all the choice of k needs.
SILHOUETTE_SAMPLE = 4000
# Images per Ray Data block: small enough that several actors share the work, large enough
# that per-block overhead stays negligible.
BLOCK_BATCHES = 8

EncoderLoader = Callable[..., object]


def embeddings_hash(cfg: Config) -> str:
    return stage_key(cfg, "embeddings", data=data_hash(cfg))


def cluster_hash(cfg: Config) -> str:
    return stage_key(cfg, STAGE, embeddings=embeddings_hash(cfg))


# --- embedding -----------------------------------------------------------------------------


def _load_configured_encoder(spec: str, device: str | None = None):
    from engine.models.encoders import load_encoder

    return load_encoder(spec, device=device)


class ImageEmbedder:
    """Ray Data actor: loads the encoder once, then turns batches of image sources into
    L2-normalised embeddings."""

    def __init__(
        self,
        encoder_spec: str,
        image_size: int,
        num_gpus: float = 0.0,
        encoder_loader: EncoderLoader | None = None,
        model_device: str = "auto",
    ):
        from engine.raylib import device_for

        loader = encoder_loader or _load_configured_encoder
        self.encoder = loader(encoder_spec, device=device_for(num_gpus, model_device))
        # An encoder that declares its input side gets images rendered at it (real CLIP wants
        # 224 px); otherwise images come at the size every stage sees.
        self.image_size = int(getattr(self.encoder, "image_size", None) or image_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.stack([load_image(str(source), self.image_size) for source in batch["source"]])
        embeddings = np.asarray(self.encoder.encode_images(images), dtype=np.float32)
        return {
            "row": np.asarray(batch["row"], dtype=np.int64),
            "embedding": l2_normalise(embeddings),
        }


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def embed_images(
    cfg: Config, sources: list[str], encoder_loader: EncoderLoader | None = None
) -> np.ndarray:
    """float32 [len(sources), d] L2-normalised embeddings of the images at ``sources`` (record
    sources), computed by an actor pool of :class:`ImageEmbedder` through Ray Data."""
    import ray

    from engine.raylib import init_ray
    from engine.resources import actor_resources

    init_ray(cfg.ray)
    if not sources:
        raise FairsynthError(
            "no images to embed: the training split is empty; check data.* settings"
        )
    c = cfg.cluster
    resources = actor_resources(cfg, "cluster", work=math.ceil(len(sources) / c.batch_size))
    frame = pd.DataFrame({"row": np.arange(len(sources), dtype=np.int64), "source": list(sources)})
    block = c.batch_size * BLOCK_BATCHES
    blocks = [frame.iloc[i : i + block] for i in range(0, len(frame), block)]
    dataset = ray.data.from_pandas(blocks).map_batches(
        ImageEmbedder,
        fn_constructor_kwargs={
            "encoder_spec": cfg.model.encoder,
            "image_size": cfg.data.image_size,
            "num_gpus": resources.num_gpus,
            "encoder_loader": encoder_loader,
            "model_device": cfg.model.device,
        },
        batch_format="numpy",
        **resources.map_batches_kwargs(),
    )
    log.info("embedding %d images with encoder %r (%s)", len(sources), cfg.model.encoder, resources.describe())
    out: np.ndarray | None = None
    seen = np.zeros(len(sources), dtype=bool)
    with tqdm(total=len(sources), desc="embed", unit="img") as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            rows, embeddings = batch["row"], batch["embedding"]
            if out is None:
                out = np.empty((len(sources), embeddings.shape[1]), dtype=np.float32)
            out[rows] = embeddings
            seen[rows] = True
            bar.update(len(rows))
    if out is None or not seen.all():
        raise FairsynthError(
            f"embedding returned {int(seen.sum())} of {len(sources)} images; re-run to retry the missing ones"
        )
    return out


def _cached_embeddings(cfg: Config, run: RunDir, n_rows: int) -> np.ndarray | None:
    meta_path = run / "cluster/embeddings.json"
    if not meta_path.exists() or not (run / "cluster/embeddings.npy").exists():
        return None
    try:
        meta = read_json(meta_path)
        if meta.get("hash") != embeddings_hash(cfg):
            return None
        array = storage.load_numpy(run / "cluster/embeddings.npy")
    except (FairsynthError, OSError, ValueError):
        return None
    return array if array.ndim == 2 and len(array) == n_rows else None


def training_embeddings(
    cfg: Config, run: RunDir, train: pd.DataFrame, encoder_loader: EncoderLoader | None = None
) -> np.ndarray:
    """Embeddings of the training records in ``train``'s order, reused from the run directory
    when the data and encoder are unchanged."""
    cached = _cached_embeddings(cfg, run, len(train))
    if cached is not None:
        log.info("reusing %s (same data and encoder)", run / "cluster/embeddings.npy")
        return cached
    start = time.perf_counter()
    embeddings = embed_images(cfg, train["source"].tolist(), encoder_loader)
    storage.save_numpy(run / "cluster/embeddings.npy", embeddings)
    atomic_write_json(
        run / "cluster/embeddings.json",
        {
            "hash": embeddings_hash(cfg),
            "encoder": cfg.model.encoder,
            "n": int(len(embeddings)),
            "dim": int(embeddings.shape[1]),
            "seconds": round(time.perf_counter() - start, 3),
        },
    )
    return embeddings


# --- clustering ----------------------------------------------------------------------------


@dataclass
class GroupClustering:
    """One group's clusters: labels numbered by decreasing cluster size."""

    labels: np.ndarray  # int64 [n]
    distances: np.ndarray  # float32 [n]
    centroids: np.ndarray  # float32 [k, d]
    silhouette: float | None = None
    silhouette_by_k: dict[int, float | None] = field(default_factory=dict)
    reason: str | None = None  # why the group has fewer clusters than asked for

    @property
    def n_clusters(self) -> int:
        return len(self.centroids)

    @property
    def sizes(self) -> list[int]:
        return np.bincount(self.labels, minlength=self.n_clusters).astype(int).tolist()


def kmeans(x: np.ndarray, k: int, cfg: ClusterConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS k-means (k-means++ seeding, ``cfg.nredo`` restarts, best objective kept, fitted
    on at most k x ``cfg.max_points_per_centroid`` sampled points): (centroids [k, d], labels
    [n] over every point)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if k > len(x):
        raise ValueError(f"k = {k} clusters need at least {k} points, got {len(x)}")
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=cfg.niter,
        nredo=cfg.nredo,
        spherical=cfg.spherical,
        seed=seed,
        init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
        # Centroids are fitted on a sample of k x max_points_per_centroid points (the
        # assignment below still covers every point): on a large group the iterations cost
        # that sample, not the group, and the objective moves by well under 1%
        # (benchmarks/cluster_speed.py). Small groups are fitted whole, without FAISS's
        # warning under 39 points per centroid.
        min_points_per_centroid=1,
        max_points_per_centroid=cfg.max_points_per_centroid,
        gpu=faiss.get_num_gpus() > 0,
        verbose=False,
    )
    km.train(x)
    _, labels = km.index.search(x, 1)
    return km.centroids.astype(np.float32), labels[:, 0].astype(np.int64)


def _member_centroids(x: np.ndarray, labels: np.ndarray, k: int, spherical: bool) -> np.ndarray:
    centroids = np.zeros((k, x.shape[1]), dtype=np.float32)
    for c in range(k):
        members = labels == c
        if members.any():
            centroids[c] = x[members].mean(axis=0, dtype=np.float64)
    return l2_normalise(centroids) if spherical else centroids


def merge_small_clusters(
    x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, min_size: int, spherical: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Fold the smallest cluster into the one with the nearest centroid until every cluster
    holds at least ``min_size`` points (or one is left); empty clusters are dropped. Returns
    (labels, centroids) with clusters renumbered by decreasing size."""
    labels = labels.copy()
    centroids = centroids.copy()
    while True:
        sizes = np.bincount(labels, minlength=len(centroids))
        if (sizes == 0).any():
            keep = np.flatnonzero(sizes > 0)
            remap = np.full(len(centroids), -1, dtype=np.int64)
            remap[keep] = np.arange(len(keep))
            labels, centroids, sizes = remap[labels], centroids[keep], sizes[keep]
        smallest = int(np.argmin(sizes))
        if len(centroids) == 1 or sizes[smallest] >= min_size:
            break
        gaps = np.linalg.norm(centroids - centroids[smallest], axis=1)
        gaps[smallest] = np.inf
        target = int(np.argmin(gaps))
        labels[labels == smallest] = target  # the emptied cluster is dropped on the next pass
        merged = x[labels == target].mean(axis=0, dtype=np.float64).astype(np.float32)
        centroids[target] = l2_normalise(merged[None])[0] if spherical else merged
    # Stable ids: cluster 0 is the largest, ties broken by first member.
    sizes = np.bincount(labels, minlength=len(centroids))
    first = np.array([np.flatnonzero(labels == c)[0] for c in range(len(centroids))])
    order = np.lexsort((first, -sizes))
    remap = np.empty(len(order), dtype=np.int64)
    remap[order] = np.arange(len(order))
    labels = remap[labels]
    return labels, _member_centroids(x, labels, len(order), spherical)


def silhouette(x: np.ndarray, labels: np.ndarray, spherical: bool, seed: int) -> float | None:
    """Mean silhouette (cosine for spherical k-means) on a seeded sample; None for one cluster."""
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2:
        return None
    if len(x) > SILHOUETTE_SAMPLE:
        pick = np.random.default_rng(seed).choice(len(x), SILHOUETTE_SAMPLE, replace=False)
        x, labels = x[pick], labels[pick]
        if len(np.unique(labels)) < 2:
            return None
    return float(silhouette_score(x, labels, metric="cosine" if spherical else "euclidean"))


def _finish(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, **info) -> GroupClustering:
    distances = np.linalg.norm(x - centroids[labels], axis=1).astype(np.float32)
    return GroupClustering(labels, distances, centroids, **info)


def _fit(x: np.ndarray, k: int, cfg: ClusterConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if k == 1:
        labels = np.zeros(len(x), dtype=np.int64)
        return labels, _member_centroids(x, labels, 1, cfg.spherical)
    centroids, labels = kmeans(x, k, cfg, seed)
    return merge_small_clusters(x, labels, centroids, cfg.min_cluster_size, cfg.spherical)


def cluster_group(x: np.ndarray, cfg: ClusterConfig, seed: int) -> GroupClustering:
    """Cluster one group's embeddings [n, d] as the module docstring describes; never fails
    for a small or empty group (it gets fewer clusters, or none, and a reason)."""
    n = len(x)
    d = x.shape[1] if x.ndim == 2 else 0
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return GroupClustering(
            empty,
            np.zeros(0, np.float32),
            np.zeros((0, d), np.float32),
            reason="no training images",
        )
    if cfg.spherical:
        x = l2_normalise(x)
    # The most clusters that could each hold min_cluster_size images.
    capacity = max(1, n // cfg.min_cluster_size)
    if cfg.k != "auto":
        return _cluster_fixed_k(x, cfg, seed, capacity)
    return _cluster_best_k(x, cfg, seed, capacity)


def _cluster_fixed_k(x: np.ndarray, cfg: ClusterConfig, seed: int, capacity: int) -> GroupClustering:
    """``cfg.k`` clusters, or as many as ``capacity`` allows."""
    k = min(cfg.k, capacity)
    reason = None
    if k < cfg.k:
        reason = f"{len(x)} images hold at most {k} clusters of min_cluster_size={cfg.min_cluster_size}"
    labels, centroids = _fit(x, k, cfg, seed)
    if reason is None and len(centroids) < k:
        reason = f"{k - len(centroids)} clusters under min_cluster_size={cfg.min_cluster_size} merged"
    return _finish(x, labels, centroids, silhouette=silhouette(x, labels, cfg.spherical, seed), reason=reason)


def _cluster_best_k(x: np.ndarray, cfg: ClusterConfig, seed: int, capacity: int) -> GroupClustering:
    """k 'auto': the k in [2, min(k_max, capacity)] with the best silhouette, or one cluster
    when none reaches ``min_silhouette``."""
    top = min(cfg.k_max, capacity)
    if top < 2:
        why = (
            f"{len(x)} images are too few for 2 clusters of min_cluster_size={cfg.min_cluster_size}"
            if cfg.k_max >= 2
            else "k_max = 1"
        )
        labels, centroids = _fit(x, 1, cfg, seed)
        return _finish(x, labels, centroids, reason=why)
    scores: dict[int, float | None] = {}
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for k in range(2, top + 1):
        labels, centroids = _fit(x, k, cfg, seed)
        score = silhouette(x, labels, cfg.spherical, seed)
        scores[k] = score
        # Ties go to the smaller k: fewer units to fine-tune for the same structure.
        if score is not None and (best is None or score > best[0] + 1e-9):
            best = (score, labels, centroids)
    if best is None or best[0] < cfg.min_silhouette:
        labels, centroids = _fit(x, 1, cfg, seed)
        shown = "none" if best is None else f"{best[0]:.3f}"
        return _finish(
            x,
            labels,
            centroids,
            silhouette_by_k=scores,
            reason=f"best silhouette {shown} < min_silhouette={cfg.min_silhouette}: no cluster structure",
        )
    score, labels, centroids = best
    return _finish(x, labels, centroids, silhouette=score, silhouette_by_k=scores)


def subtype_nmi(subtypes: pd.Series, labels: np.ndarray) -> float | None:
    """Normalised mutual information (arithmetic mean) between clusters and sub-types; None
    when the dataset has no sub-types or the group is empty."""
    from sklearn.metrics import normalized_mutual_info_score

    if len(labels) == 0 or subtypes.fillna("").astype(str).eq("").all():
        return None
    return float(normalized_mutual_info_score(subtypes.astype(str).to_numpy(), labels))


# --- the stage -----------------------------------------------------------------------------


def run_cluster_stage(
    cfg: Config, run: RunDir, encoder_loader: EncoderLoader | None = None
) -> pd.DataFrame:
    """Write RUN/cluster/ (see the module docstring) and return the assignments, one row per
    training image. Skipped when complete; runs the data stage first when it is missing.
    ``encoder_loader(spec, device=...)`` replaces ``engine.models.encoders.load_encoder``."""
    if run.is_complete(STAGE, cluster_hash(cfg)):
        return load_assignments(run)
    start = time.perf_counter()
    dataset = run_data_stage(cfg, run)
    train = dataset.split("train")
    embeddings = training_embeddings(cfg, run, train, encoder_loader)
    embed_seconds = time.perf_counter() - start

    c = cfg.cluster
    dim = embeddings.shape[1]
    cluster_ids = np.full(len(train), -1, dtype=np.int64)
    distances = np.full(len(train), np.nan, dtype=np.float32)
    group_means = np.full((dataset.n_groups, dim), np.nan, dtype=np.float32)
    centroids: dict[str, np.ndarray] = {}
    groups: list[dict] = []
    group_of = train["group"].to_numpy()
    for group in tqdm(range(dataset.n_groups), desc="cluster", unit="group"):
        rows = np.flatnonzero(group_of == group)
        x = embeddings[rows]
        result = cluster_group(x, c, seed=c.seed + group)
        cluster_ids[rows], distances[rows] = result.labels, result.distances
        centroids[f"group_{group}"] = result.centroids.reshape(result.n_clusters, dim)
        if len(rows):
            group_means[group] = l2_normalise(x).mean(axis=0)
        groups.append(_group_summary(dataset, group, rows, train, result))
        if result.reason:
            log.info(
                "group %d (%s): %d clusters: %s",
                group,
                dataset.group_name(group),
                result.n_clusters,
                result.reason,
            )

    assignments = pd.DataFrame(
        {
            "image_id": train["image_id"].to_numpy(),
            "group": group_of.astype(np.int64),
            "cluster": cluster_ids,
            "distance": distances,
        }
    )
    buffer = io.BytesIO()
    assignments.to_parquet(buffer, index=False)
    atomic_write_bytes(run / "cluster/assignments.parquet", buffer.getvalue())
    buffer = io.BytesIO()
    np.savez(buffer, **centroids)
    atomic_write_bytes(run / "cluster/centroids.npz", buffer.getvalue())
    storage.save_numpy(run / "cluster/group_means.npy", group_means)
    summary = _stage_summary(cfg, dataset, groups, dim, embed_seconds, time.perf_counter() - start)
    atomic_write_json(run / "cluster/summary.json", summary)
    run.mark_complete(STAGE, cluster_hash(cfg))
    return assignments


def _group_summary(
    dataset: GroupedDataset,
    group: int,
    rows: np.ndarray,
    train: pd.DataFrame,
    result: GroupClustering,
) -> dict:
    return {
        "group": group,
        "name": dataset.group_name(group),
        "n_images": int(len(rows)),
        "n_clusters": result.n_clusters,
        "cluster_sizes": result.sizes,
        "silhouette": None if result.silhouette is None else round(result.silhouette, 4),
        "silhouette_by_k": {
            str(k): None if s is None else round(s, 4) for k, s in result.silhouette_by_k.items()
        },
        "reason": result.reason,
        "nmi": subtype_nmi(train["subtype"].iloc[rows], result.labels),
    }


def _stage_summary(
    cfg: Config,
    dataset: GroupedDataset,
    groups: list[dict],
    dim: int,
    embed_s: float,
    total_s: float,
) -> dict:
    c = cfg.cluster
    # Groups too small to split say nothing about cluster quality (NMI is 1 for one image and
    # 0 for one cluster over several sub-types), so the headline NMI covers the others.
    splittable = [
        g for g in groups if g["nmi"] is not None and g["n_images"] >= 2 * c.min_cluster_size
    ]
    nmis = [g["nmi"] for g in splittable]
    return {
        "dataset": dataset.name,
        "encoder": cfg.model.encoder,
        "dim": dim,
        "n_images": int(sum(g["n_images"] for g in groups)),
        "k": c.k,
        "spherical": c.spherical,
        "min_cluster_size": c.min_cluster_size,
        "groups": groups,
        "nmi_per_group": {str(g["group"]): g["nmi"] for g in groups if g["nmi"] is not None},
        "nmi_groups_counted": [g["group"] for g in splittable],
        "nmi_min": min(nmis) if nmis else None,
        "nmi_mean": float(np.mean(nmis)) if nmis else None,
        "seconds": {"embed": round(embed_s, 3), "total": round(total_s, 3)},
    }


# --- reading the outputs back --------------------------------------------------------------


def load_assignments(run: RunDir) -> pd.DataFrame:
    """RUN/cluster/assignments.parquet: image_id, group, cluster, distance."""
    path = run / "cluster/assignments.parquet"
    if not path.exists():
        raise FairsynthError(f"missing {path}: run jobs/cluster.py --run-dir {run.root} first")
    return storage.read_parquet(path).to_pandas()
