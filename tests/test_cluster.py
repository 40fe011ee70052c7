"""The cluster stage: per-group k-means on known structure, small and empty groups, and the
job on the built-in benchmark with the shipped tiny encoder (every training image assigned
exactly once, clusters that recover the sub-types, re-runs that skip)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.config import load_config
from engine.raylib import local_ray
from engine.runs import RunDir
from engine.stages.cluster.stage import (
    cluster_group,
    kmeans,
    merge_small_clusters,
    run_cluster_stage,
    subtype_nmi,
)

ROOT = Path(__file__).resolve().parents[1]
NMI_TARGET = 0.8


def cluster_cfg(**values):
    return load_config(None, [f"cluster.{k}={v}" for k, v in values.items()]).cluster


def blobs(sizes, dim=16, spread=0.05, seed=0, centres=None):
    """Points on the unit sphere around well-separated centres; labels = blob index."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = np.eye(dim, dtype=np.float32)[: len(sizes)]
    x = np.concatenate(
        [c + spread * rng.standard_normal((n, dim)) for c, n in zip(centres, sizes, strict=True)]
    )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return x.astype(np.float32), labels


# --- clustering one group ------------------------------------------------------------------


def test_auto_k_recovers_separated_blobs():
    x, truth = blobs([40, 30, 20])
    result = cluster_group(x, cluster_cfg(k="auto", k_max=6, min_cluster_size=8), seed=0)
    assert result.n_clusters == 3
    assert result.sizes == [40, 30, 20]  # numbered by decreasing size
    assert subtype_nmi(pd.Series(truth.astype(str)), result.labels) == pytest.approx(1.0)
    assert result.reason is None and result.silhouette > 0.5
    assert result.centroids.shape == (3, 16)
    assert np.allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-5)
    expected = np.linalg.norm(x - result.centroids[result.labels], axis=1)
    assert np.allclose(result.distances, expected, atol=1e-5)


def test_clustering_is_seeded():
    x, _ = blobs([30, 30, 30, 30], spread=0.4, seed=3)
    cfg = cluster_cfg(k=3)
    first, second = cluster_group(x, cfg, seed=7), cluster_group(x, cfg, seed=7)
    assert np.array_equal(first.labels, second.labels)
    assert np.array_equal(first.centroids, second.centroids)


def test_large_group_fits_on_a_sample_and_assigns_every_point():
    """Centroids fitted on k x max_points_per_centroid sampled points: every point is still
    labelled, the blobs are found, and a group under the sample size is fitted whole."""
    x, truth = blobs([3000, 2000, 1000], seed=1)
    sampled, full = cluster_cfg(max_points_per_centroid=64), cluster_cfg(max_points_per_centroid=10**6)
    centroids, labels = kmeans(x, 3, sampled, seed=0)
    assert labels.shape == (6000,) and set(labels.tolist()) == {0, 1, 2}
    assert subtype_nmi(pd.Series(truth.astype(str)), labels) == pytest.approx(1.0)
    # The sample reached FAISS: centroids fitted on 192 points are not those of all 6,000.
    assert not np.array_equal(centroids, kmeans(x, 3, full, seed=0)[0])
    small = x[::40]  # 150 points < 3 x 64: fitted whole, as with no sampling at all
    assert np.array_equal(kmeans(small, 3, sampled, seed=0)[1], kmeans(small, 3, full, seed=0)[1])


def test_the_fit_sample_size_is_part_of_the_clustering_key():
    from engine.stages.cluster.stage import cluster_hash

    base = load_config()
    assert cluster_hash(base) != cluster_hash(load_config(None, ["cluster.max_points_per_centroid=64"]))
    assert cluster_hash(base) == cluster_hash(load_config(None, ["cluster.batch_size=7"]))


def _centroids(run_dir) -> dict[int, np.ndarray]:
    """group -> [k_g, d] centroids, as the stage wrote them to RUN/cluster/centroids.npz."""
    with np.load(run_dir / "cluster/centroids.npz") as arrays:
        return {int(key.removeprefix("group_")): arrays[key] for key in arrays.files}


def test_unstructured_group_stays_one_cluster():
    x = np.random.default_rng(0).standard_normal((200, 32)).astype(np.float32)
    result = cluster_group(x, cluster_cfg(k="auto"), seed=0)
    assert result.n_clusters == 1 and result.sizes == [200]
    assert "min_silhouette" in result.reason


def test_small_cluster_merges_into_nearest():
    dim = 16
    centres = np.eye(dim, dtype=np.float32)[:3]
    # The third blob (3 points) sits near the second: it must join the second, not the first.
    centres[2] = centres[1] * 0.8 + centres[2] * 0.2
    x, truth = blobs([40, 30, 3], dim=dim, spread=0.02, centres=centres)
    _, labels = np.unique(truth, return_inverse=True)
    seed_centroids = np.stack([x[truth == b].mean(0) for b in range(3)])
    merged, centroids = merge_small_clusters(x, labels, seed_centroids, min_size=8, spherical=True)
    assert len(centroids) == 2
    assert np.bincount(merged).tolist() == [40, 33]
    assert len(set(merged[truth == 2]) | set(merged[truth == 1])) == 1


def test_fixed_k_is_capped_by_group_size():
    x, _ = blobs([10, 10, 10], spread=0.02)
    result = cluster_group(x, cluster_cfg(k=5, min_cluster_size=8), seed=0)
    assert result.n_clusters == 3  # 30 images hold at most 3 clusters of 8
    assert "at most 3 clusters" in result.reason
    assert min(result.sizes) >= 8


@pytest.mark.parametrize("n", [1, 5, 15])
def test_group_too_small_to_split_gets_one_cluster(n):
    x, _ = blobs([n])
    result = cluster_group(x, cluster_cfg(k="auto", min_cluster_size=8), seed=0)
    assert result.n_clusters == 1 and result.sizes == [n]
    assert "too few" in result.reason


def test_empty_group_gets_no_clusters():
    result = cluster_group(np.zeros((0, 16), np.float32), cluster_cfg(k=4), seed=0)
    assert result.n_clusters == 0 and result.centroids.shape == (0, 16)
    assert result.reason == "no training images"


# --- the stage and the job on the built-in benchmark ---------------------------------------


def _env():
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


@pytest.fixture(scope="module")
def clustered_run(tmp_path_factory):
    """The job, as users run it, on the built-in benchmark (original severity)."""
    run_dir = tmp_path_factory.mktemp("cluster_run")
    cmd = [
        sys.executable,
        str(ROOT / "jobs/cluster.py"),
        "--run-dir",
        str(run_dir),
        "--set",
        "ray.num_cpus=2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout, cmd


def test_job_assigns_every_training_image_once(clustered_run):
    run_dir, stdout, _ = clustered_run
    records = pd.read_parquet(run_dir / "data/records.parquet")
    train = records[records["split"] == "train"].reset_index(drop=True)
    assignments = pd.read_parquet(run_dir / "cluster/assignments.parquet")

    assert list(assignments.columns) == ["image_id", "group", "cluster", "distance"]
    assert assignments["image_id"].is_unique
    assert assignments["image_id"].tolist() == train["image_id"].tolist()
    assert (assignments["group"].to_numpy() == train["group"].to_numpy()).all()
    assert (assignments["cluster"] >= 0).all() and assignments["distance"].between(0, 2).all()

    summary = json.loads((run_dir / "cluster/summary.json").read_text())
    embeddings = np.load(run_dir / "cluster/embeddings.npy")
    assert embeddings.shape == (len(train), summary["dim"])
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)
    centroids = _centroids(run_dir)
    means = np.load(run_dir / "cluster/group_means.npy")
    assert means.shape == (4, summary["dim"])
    for g in summary["groups"]:
        members = assignments[assignments["group"] == g["group"]]
        assert (
            np.bincount(members["cluster"], minlength=g["n_clusters"]).tolist()
            == g["cluster_sizes"]
        )
        assert centroids[g["group"]].shape == (g["n_clusters"], summary["dim"])
        rows = members.index.to_numpy()
        assert np.allclose(means[g["group"]], embeddings[rows].mean(0), atol=1e-5)
    assert "NMI" in stdout


def test_clusters_recover_builtin_subtypes(clustered_run):
    run_dir, stdout, _ = clustered_run
    summary = json.loads((run_dir / "cluster/summary.json").read_text())
    nmi = {int(g): v for g, v in summary["nmi_per_group"].items()}
    assert sorted(nmi) == [0, 1, 2, 3] and summary["nmi_groups_counted"] == [0, 1, 2, 3]
    assert min(nmi.values()) >= NMI_TARGET, (
        f"NMI per group {nmi}, clusters {[g['cluster_sizes'] for g in summary['groups']]}"
    )


def test_job_rerun_skips_and_new_k_reuses_embeddings(clustered_run, tmp_path):
    import ray

    run_dir, _, cmd = clustered_run
    before = (run_dir / "cluster/assignments.parquet").stat().st_mtime_ns
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "cluster/assignments.parquet").stat().st_mtime_ns == before

    # Another k re-clusters from the stored embeddings, without starting Ray.
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    embedded = (copy / "cluster/embeddings.npy").stat().st_mtime_ns
    again = run_cluster_stage(load_config(None, ["cluster.k=2"]), RunDir(copy))
    assert not ray.is_initialized()
    assert (copy / "cluster/embeddings.npy").stat().st_mtime_ns == embedded
    assert again.groupby("group")["cluster"].nunique().tolist() == [2, 2, 2, 2]


def test_extreme_severity_leaves_empty_groups_unclustered(tmp_path):
    # At p = 0.999 with 200 images per class no bias-conflicting image survives: groups 1
    # (landbird on water) and 2 (waterbird on land) are empty.
    cfg = load_config(None, ["data.severity=0.999", "data.builtin.n_train=400", "ray.num_cpus=2"])
    run = RunDir(tmp_path)
    run.prepare(cfg)
    with local_ray(num_cpus=2):
        assignments = run_cluster_stage(cfg, run)
    assert sorted(assignments["group"].unique()) == [0, 3] and assignments["image_id"].is_unique
    summary = json.loads((tmp_path / "cluster/summary.json").read_text())
    empty = [g for g in summary["groups"] if g["n_images"] == 0]
    assert [g["group"] for g in empty] == [1, 2]
    assert all(g["n_clusters"] == 0 and g["reason"] == "no training images" for g in empty)
    means = np.load(tmp_path / "cluster/group_means.npy")
    assert np.isnan(means[[1, 2]]).all() and np.isfinite(means[[0, 3]]).all()
    assert _centroids(tmp_path)[1].shape[0] == 0
    assert summary["nmi_groups_counted"] == [0, 3]
