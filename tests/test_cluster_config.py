"""cluster.yaml passes Ray's own autoscaler validator, offline, and keeps the cluster private."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_validates_with_ray():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(config))


def test_cluster_yaml_security_and_scaling():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "--dashboard-host=127.0.0.1" in head  # not exposed publicly
    assert "~/.ray/auth_token" in config["file_mounts"]
    gpu_types = {k: v for k, v in config["available_node_types"].items() if v["resources"].get("GPU")}
    assert gpu_types and all(v["min_workers"] == 0 and v["max_workers"] > 0 for v in gpu_types.values())
    assert any(v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for v in gpu_types.values())
    assert any("pip install" in c and "-e" in c for c in config["setup_commands"])
