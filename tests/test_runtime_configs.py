"""The cluster configs under runtime/: each parses, opens with a comment that says how to use
it, and gives trials what they ask for (a T4 worker type exposing the accelerator resource, a
GPU-less head that runs the drivers, token auth, a dashboard on loopback)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

RUNTIME = Path(__file__).resolve().parent.parent / "runtime"
YAMLS = sorted(p for p in RUNTIME.rglob("*") if p.suffix in (".yaml", ".yml"))
LAUNCHER = [p for p in YAMLS if "provider" in (yaml.safe_load(p.read_text()) or {})]
T4 = {"accelerator_type:T4": 1}
LAUNCHER_KEYS = {"cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                 "file_mounts", "initialization_commands", "setup_commands", "head_setup_commands",
                 "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"}


def test_the_expected_configs_are_there():
    names = {p.name for p in RUNTIME.rglob("*") if p.is_file()}
    assert {"gcp-t4.yaml", "aws-t4.yaml", "kuberay-t4.yaml", "kaggle.md", "README.md"} <= names
    assert {p.name for p in LAUNCHER} == {"gcp-t4.yaml", "aws-t4.yaml"}


@pytest.mark.parametrize("path", sorted(p for p in RUNTIME.rglob("*") if p.is_file()), ids=lambda p: p.name)
def test_every_file_opens_with_a_comment_saying_how_to_use_it(path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        assert text.startswith("<!--"), f"{path.name}: open with an HTML comment"
        head = text[: text.index("-->")]
    else:
        lines = text.splitlines()
        assert lines[0].startswith("# "), f"{path.name}: open with a comment"
        head = "\n".join(line for line in lines[: next(i for i, l in enumerate(lines) if not l.startswith("#"))])
    assert any(cmd in head for cmd in ("ray up", "kubectl apply", "qlora-ray submit", "qlora-ray cluster check")), head


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


# ---------------------------------------------------------------- cluster launcher (GCP, AWS)

@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_is_valid_for_ray(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert LAUNCHER_KEYS <= set(cfg), f"missing: {LAUNCHER_KEYS - set(cfg)}"
    # Ray's own schema (python/ray/autoscaler/ray-schema.json) after its provider defaults.
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_ray_schema_would_catch_a_typo():
    """The check above has teeth: a misspelt top-level key is refused by Ray's schema."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(LAUNCHER[0].read_text(encoding="utf-8"))
    cfg["setup_command"] = cfg.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(cfg))


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_node_types(path):
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    # The head runs the trial drivers: no GPU, no accelerator label, never preemptible.
    assert head["resources"].get("GPU") == 0 and not any(k.startswith("accelerator_type:") for k in head["resources"])
    head_config = json.dumps(head["node_config"])
    assert "preemptible" not in head_config and "spot" not in head_config.lower()
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    t4 = [t for t in workers.values() if t["resources"].get("accelerator_type:T4")]
    assert t4, "no worker type exposes accelerator_type:T4"
    for node_type in t4:
        res = node_type["resources"]
        assert res["GPU"] == 1 and res["accelerator_type:T4"] == 1 and res["t4_worker"] == 1
        assert res["CPU"] >= 2
        node_config = node_type["node_config"]
        if cfg["provider"]["type"] == "gcp":
            assert node_config["guestAccelerators"] == [{"acceleratorType": "nvidia-tesla-t4", "acceleratorCount": 1}]
            assert node_config["machineType"] == "n1-standard-8"
            assert {"onHostMaintenance": "TERMINATE"} in node_config["scheduling"]
        else:
            assert node_config["InstanceType"] == "g4dn.xlarge"
        assert node_type["max_workers"] <= cfg["max_workers"]


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_token_auth_and_loopback_dashboard(path):
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("RAY_AUTH_MODE=token" in c for c in cfg["initialization_commands"])
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])
    setup = " ".join(cfg["setup_commands"] + cfg["head_setup_commands"] + cfg["worker_setup_commands"])
    assert "ray[default,train,tune]==" in setup and "-e ~/qlora-ray" in setup
    assert cfg["file_mounts"]["~/qlora-ray"] == "."


# ---------------------------------------------------------------- KubeRay

def _raycluster():
    docs = [d for d in yaml.safe_load_all((RUNTIME / "kuberay-t4.yaml").read_text(encoding="utf-8")) if d]
    assert [d["kind"] for d in docs] == ["RayCluster"], "the token Secret is made by kubectl, not kept here"
    return docs[0]


def _ray_resources(param: str) -> dict:
    """rayStartParams.resources is a quoted JSON string (KubeRay passes it to `ray start --resources`)."""
    return json.loads(json.loads(param))


def test_kuberay_manifest():
    rc = _raycluster()
    assert rc["apiVersion"] == "ray.io/v1" and set(rc) >= {"apiVersion", "kind", "metadata", "spec"}
    spec = rc["spec"]
    assert set(spec) >= {"rayVersion", "headGroupSpec", "workerGroupSpecs"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    groups = spec["workerGroupSpecs"]
    t4 = [g for g in groups if _ray_resources(g["rayStartParams"].get("resources", '"{}"')).get("accelerator_type:T4")]
    assert len(t4) == 1
    group = t4[0]
    assert _ray_resources(group["rayStartParams"]["resources"]) == {**T4, "t4_worker": 1}
    assert group["rayStartParams"]["num-gpus"] == "1"
    pod = group["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"] == container["resources"]["limits"]
    for group_spec in [head, *groups]:
        # KubeRay wants every rayStartParams value as a string.
        assert all(isinstance(v, str) for v in group_spec["rayStartParams"].values())


def test_kuberay_token_from_a_secret_in_every_container():
    spec = _raycluster()["spec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "qlora-ray-token", "key": "auth_token"}
