"""cluster.yaml against the autoscaler's JSON schema shipped inside the ray package."""

import json
import os
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def schema():
    path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid_for_the_ray_autoscaler(schema, cluster):
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(cluster)]
    assert errors == []
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))  # Ray's own checks after merging AWS defaults


def test_cluster_has_gpu_and_cpu_worker_groups_with_limits(cluster):
    types = cluster["available_node_types"]
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    cpu_only = [n for n, t in types.items()
                if n != cluster["head_node_type"] and not t["resources"].get("GPU")]
    assert gpu and cpu_only
    assert all(t["max_workers"] >= 1 for n, t in types.items() if n != cluster["head_node_type"])
    assert sum(t["max_workers"] for n, t in types.items()
               if n != cluster["head_node_type"]) <= cluster["max_workers"]
    profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for t in types.values()}
    assert profiles == {"lasb-ray-node"}  # S3 through an instance profile, no keys in files
    assert any("pip install" in c and "lasb" in c for c in cluster["setup_commands"])


def test_schema_rejects_a_broken_copy(schema, cluster):
    broken = {**cluster, "available_node_types": {
        **cluster["available_node_types"], "gpu": {"resources": {"GPU": 0.5}}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(broken)
