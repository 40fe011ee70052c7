"""A Ray this project starts shares the machine with other Rays: none of its ports is one of
Ray's fixed defaults, which the first Ray on a machine holds (a second head's dashboard agent
then cannot bind and job submission fails), and every Ray call, in the driver and in its
workers, finds this Ray, not another one on the machine."""

from __future__ import annotations

import os

import pytest

# Ray's fixed defaults: GCS, dashboard, dashboard agent (HTTP), Ray Client server.
RAY_DEFAULT_PORTS = {6379, 8265, 52365, 10001}
NODE_PORT_FIELDS = ("NodeManagerPort", "ObjectManagerPort", "MetricsExportPort", "MetricsAgentPort",
                    "DashboardAgentListenPort", "RuntimeEnvAgentPort")


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _node_ports(node: dict) -> dict[str, int]:
    return {field: int(node[field]) for field in NODE_PORT_FIELDS}


@pytest.fixture
def own_ray_address(monkeypatch):
    """RAY_ADDRESS as the shell had it, put back after the test (a local Ray names itself there)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_a_jobs_local_ray_opens_no_default_port_and_its_workers_state_calls_find_it(own_ray_address):
    import ray
    from ray.util.state import list_nodes

    from engine.config import RayConfig
    from engine.raylib import init_ray

    init_ray(RayConfig(num_cpus=1, dashboard=True))
    try:
        context = ray.get_runtime_context()
        gcs_address = context.gcs_address
        (node,) = ray.nodes()
        dashboard = ray._private.worker.global_worker.node.webui_url

        @ray.remote(num_cpus=0)
        def seen_from_a_worker():
            return os.environ.get("RAY_ADDRESS"), [n.node_id for n in list_nodes()]

        worker_address, worker_nodes = ray.get(seen_from_a_worker.remote())
        driver_nodes = [n.node_id for n in list_nodes()]
    finally:
        ray.shutdown()

    ports = {"gcs": _port(gcs_address), "dashboard": _port(dashboard), **_node_ports(node)}
    assert all(ports.values()) and not set(ports.values()) & RAY_DEFAULT_PORTS, ports
    assert dashboard.startswith("127.0.0.1:")
    # The state API (Ray Train's placement-group cleaner calls it in a worker) asks this Ray.
    assert os.environ["RAY_ADDRESS"] == worker_address == gcs_address
    assert worker_nodes == driver_nodes == [node["NodeID"]]


def test_a_local_clusters_nodes_open_no_default_port_and_the_address_is_put_back(own_ray_address):
    import ray
    from ray._private.utils import read_ray_address

    from engine.raylib import local_cluster

    with local_cluster(num_cpus=0, include_dashboard=False) as cluster:
        cluster.add_node(num_cpus=1)
        address = cluster.address
        ray.init(address=address)
        cluster.wait_for_nodes()
        named = os.environ.get("RAY_ADDRESS")
        nodes = [n for n in ray.nodes() if n["Alive"]]
    assert named == address
    assert "RAY_ADDRESS" not in os.environ and read_ray_address() != address
    assert len(nodes) == 2
    for node in nodes:
        ports = _node_ports(node)
        assert all(ports.values()) and not set(ports.values()) & RAY_DEFAULT_PORTS, ports
    assert _port(address) not in RAY_DEFAULT_PORTS
