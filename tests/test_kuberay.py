"""deploy/kuberay/rayjob.yaml is a RayJob that KubeRay's published CRD accepts.

The CRD's OpenAPI v3 schema (deploy/kuberay/crd/, a named KubeRay release) is checked with
jsonschema the way the API server checks a create with strict field validation (kubectl's
default): an unknown field is an error except where the schema preserves unknown fields,
``x-kubernetes-int-or-string`` takes an integer or a string, and the other ``x-kubernetes-*``
extensions (CEL rules, list types) are not evaluated. The CRD leaves the root ``metadata`` to
the API server's ObjectMeta; the test checks the fields a RayJob's author sets there.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "deploy/kuberay/rayjob.yaml"
CRD = ROOT / "deploy/kuberay/crd/ray.io_rayjobs.yaml"

SUBSCHEMA_KEYS = ("items", "not", "additionalProperties")
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "generateName": {"type": "string"}, "namespace": {"type": "string"},
        "labels": STRING_MAP, "annotations": STRING_MAP,
    },
    "additionalProperties": False,
}
SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf")


def strict_schema(node: dict) -> dict:
    """A Kubernetes structural schema as a JSON schema with strict field validation."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if "properties" in node:
        out["properties"] = {name: strict_schema(sub) for name, sub in node["properties"].items()}
    for key in SUBSCHEMA_KEYS:
        if isinstance(node.get(key), dict):
            out[key] = strict_schema(node[key])
    for key in SUBSCHEMA_LISTS:
        if key in node:
            out[key] = [strict_schema(sub) for sub in node[key]]
    if node.get("x-kubernetes-int-or-string"):
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserves = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-embedded-resource")
    if node.get("type") == "object" and "additionalProperties" not in node and not preserves:
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd() -> dict:
    return yaml.safe_load(CRD.read_text())


@pytest.fixture(scope="module")
def validator(crd) -> jsonschema.Draft7Validator:
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def errors(validator, document) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_the_rayjob_matches_the_published_crd(crd, validator, manifest):
    assert manifest["apiVersion"] == f"{crd['spec']['group']}/v1"
    assert manifest["kind"] == crd["spec"]["names"]["kind"]
    assert errors(validator, manifest) == []


@pytest.mark.parametrize(
    "path, value",
    [
        (("spec", "shutdownAfterJobFinish"), True),  # misspelt field
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "minReplica"), 0),  # misspelt, nested
        (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0, "imagePullPolicyy"), "Always"),
        (("spec", "activeDeadlineSeconds"), "a day"),  # wrong type
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "rayStartParams", "num-gpus"), 1),  # strings only
        (("spec", "rayClusterSpec", "authOptions", "mode"), "password"),  # not in the enum
    ],
)
def test_the_check_rejects_a_broken_rayjob(validator, manifest, path, value):
    broken = copy.deepcopy(manifest)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert errors(validator, broken), f"{'.'.join(map(str, path))}={value!r} passed"


def test_int_or_string_fields_take_both(validator, manifest):
    for limit in (8, "8", "7500m"):
        document = copy.deepcopy(manifest)
        worker = document["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        worker["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = limit
        assert errors(validator, document) == []
    worker["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = [8]
    assert errors(validator, document)


def test_the_rayjob_runs_the_paper_preset_from_zero_gpus(manifest):
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["activeDeadlineSeconds"] > 0
    assert re.search(r"jobs/full\.py --config waterbirds_0999\b", spec["entrypoint"])
    assert re.search(r"--set run_dir=s3://", spec["entrypoint"])
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in str(head.get("resources"))
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] > 0
    assert int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])


def test_the_runtime_env_installs_what_pyproject_asks_for(manifest):
    import tomllib

    runtime_env = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip")
    pip = set(runtime_env["pip"]["packages"])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # Ray itself comes with the image, whose tag names the same Ray version.
    wanted = {d.replace(" ", "") for d in project["dependencies"] if not d.startswith("ray[")}
    wanted |= set(project["optional-dependencies"]["gpu"])
    assert pip == wanted
    ray_pin = next(d for d in project["dependencies"] if d.startswith("ray["))
    version = manifest["spec"]["rayClusterSpec"]["rayVersion"]
    assert re.fullmatch(r"ray\[.*\]==(.*)", ray_pin).group(1).rstrip("*").rstrip(".") in version
    images = re.findall(r"image: (\S+)", MANIFEST.read_text())
    assert images and all(f"rayproject/ray:{version}-" in image for image in images)
