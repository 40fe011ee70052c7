"""cluster.yaml passes Ray's own autoscaler validator, offline, and keeps the cluster private."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
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


ROOT = CLUSTER_YAML.parent


def _node_types() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())["available_node_types"]


def test_ray_makes_no_security_group_of_its_own(monkeypatch):
    """Ray's default group admits SSH from 0.0.0.0/0; every node type names the cluster's own
    group instead (SSH from the user's CIDR), so Ray's bootstrap has nothing to create."""
    from ray.autoscaler._private.aws import config as aws_config

    def refuse(config, node_types):
        raise AssertionError(f"Ray would create its default security group for {node_types}")

    monkeypatch.setattr(aws_config, "_upsert_security_groups", refuse)
    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    configured = aws_config._configure_security_group(config)
    assert {tuple(t["node_config"]["SecurityGroupIds"]) for t in configured["available_node_types"].values()} == {
        ("sg-REPLACE-ME",)}


def _policy(name: str) -> list[dict]:
    statements = json.loads((ROOT / name).read_text())["Statement"]
    for s in statements:
        s["Action"] = [s["Action"]] if isinstance(s["Action"], str) else s["Action"]
    return statements


def test_head_and_workers_have_their_own_least_privilege_profiles():
    types = _node_types()
    profile = {name: t["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[-1] for name, t in types.items()}
    head = profile.pop("head")
    assert set(profile.values()) == {"fairsynth-worker"} and head == "fairsynth-head"

    worker = _policy("cluster-worker-policy.json")
    assert all(a.startswith("s3:") and "*" not in a for s in worker for a in s["Action"])
    assert all(s["Resource"].startswith("arn:aws:s3:::YOUR-BUCKET") for s in worker)

    statements = _policy("cluster-head-policy.json")
    actions = {a for s in statements for a in s["Action"]}
    assert not any("*" in a for a in actions) and {"ec2:RunInstances", "ec2:TerminateInstances", "iam:PassRole"} <= actions
    for s in statements:
        if s["Resource"] == "*":  # describing, and launching (what it may pass to a launch is bounded below)
            assert all(a.startswith("ec2:Describe") or a == "ec2:RunInstances" for a in s["Action"]), s
        if "ec2:TerminateInstances" in s["Action"]:
            assert s["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == "fairsynth"
    (pass_role,) = [s for s in statements if "iam:PassRole" in s["Action"]]
    assert pass_role["Resource"].endswith(":role/fairsynth-worker")


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed (apt-get install rsync)")
def test_file_mounts_leave_the_venv_local_runs_and_env_files_behind(tmp_path):
    """The exclusions go through Ray's own rsync arguments to a real rsync, as `ray up` runs it."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    config = yaml.safe_load(CLUSTER_YAML.read_text())
    assert config["file_mounts"]["~/fairsynth"] == "."
    source = tmp_path / "fairsynth"
    for name in (".venv/bin/python", "runs/tiny/results.json", ".env", ".env.production", "configs/.env",
                 "engine/cli.py", "configs/tiny.yaml", "docs/runs.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text("x")
    args = SSHCommandRunner._create_rsync_filter_args(None, {"rsync_exclude": config["rsync_exclude"]})
    subprocess.run(["rsync", "-a", *args, f"{source}/", str(tmp_path / "node")], check=True)
    copied = sorted(str(p.relative_to(tmp_path / "node")) for p in (tmp_path / "node").rglob("*") if p.is_file())
    assert copied == ["configs/tiny.yaml", "docs/runs.md", "engine/cli.py"]
