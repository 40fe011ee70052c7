"""The cluster stage: image embeddings, then k-means within each group (engine.stages.cluster.stage)."""

from engine.stages.cluster.stage import cluster_hash, load_assignments, run_cluster_stage

__all__ = ["cluster_hash", "load_assignments", "run_cluster_stage"]
