"""``qlora-ray cluster check``: the 4-bit probe on its own, and the command against a real
multi-node Ray cluster on loopback (a head and two worker nodes whose GPU is a T4 label)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_ray.cluster import ClusterReport, NodeReport, ProbeResult, probe_4bit

sys.path.insert(0, str(Path(__file__).parent))
from multinode import T4_WORKER, LoopbackCluster  # noqa: E402

CLI = [sys.executable, "-m", "qlora_ray"]


# ---------------------------------------------------------------- the probe, in this process

def test_probe_runs_nf4_on_cpu():
    result = probe_4bit(use_cuda=False)
    assert result.ok, result.error
    assert result.device == "cpu"
    assert result.versions["bitsandbytes"] and result.versions["torch"]


def test_probe_names_a_missing_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    result = probe_4bit(use_cuda=False)
    assert not result.ok
    assert result.error.startswith("ModuleNotFoundError") and "bitsandbytes" in result.error


def test_probe_refuses_a_gpu_without_cuda_unless_allowed():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = probe_4bit(use_cuda=True)
    assert not result.ok
    assert "sees no CUDA device" in result.error and "would train on the CPU" in result.error
    allowed = probe_4bit(use_cuda=True, allow_cpu=True)
    assert allowed.ok and allowed.device == "cpu" and allowed.note


def test_report_groups_gpus_by_type_and_ignores_dead_nodes():
    def node(i, gpus, accel, alive=True, ok=True):
        n = NodeReport(node_id=f"{i:056x}", address="10.0.0.1", hostname="h", alive=alive, is_head=i == 0,
                       cpus=8, gpus=gpus, accelerator=accel, custom={})
        if alive:
            n.probes.append(ProbeResult(ok=ok, device="cuda" if gpus else "cpu", error=None if ok else "boom"))
        return n

    report = ClusterReport("x:1", "2.60.0", [node(0, 0, None), node(1, 1, "T4"), node(2, 2, "T4"),
                                             node(3, 1, None, ok=False), node(4, 1, "T4", alive=False)])
    assert report.gpus_by_type == {"T4": 3.0, "unknown": 1.0}
    assert [n.node_id[-1] for n in report.failures] == ["3"]
    assert report.nodes[4].ok is None  # dead: not checked, not a failure


# ---------------------------------------------------------------- against a real cluster

@pytest.fixture(scope="module")
def t4_cluster(tmp_path_factory):
    """A head (no GPU) and two worker nodes with one logical GPU labelled T4 each; token auth on."""
    log = tmp_path_factory.mktemp("cluster") / "cluster.log"
    with LoopbackCluster(head={"num_cpus": 2, "num_gpus": 0}, workers=[T4_WORKER, T4_WORKER],
                         log_path=log) as cluster:
        yield cluster


def _check(cluster, *args, env=None, timeout=300):
    start = time.time()
    proc = subprocess.run([*CLI, "cluster", "check", cluster.address, *args], capture_output=True,
                          text=True, env=env or cluster.env(), timeout=timeout)
    return proc, time.time() - start


@pytest.mark.ray
def test_check_every_node_of_a_multinode_cluster(t4_cluster):
    # The client holds only RAY_AUTH_TOKEN: the command turns token auth on by itself.
    proc, seconds = _check(t4_cluster, "--allow-logical-gpus", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    nodes = report["nodes"]
    assert len(nodes) == 3 and all(n["alive"] for n in nodes)
    assert report["gpus_by_type"] == {"T4": 2.0}
    head = [n for n in nodes if n["is_head"]]
    workers = [n for n in nodes if not n["is_head"]]
    assert len(head) == 1 and head[0]["gpus"] == 0 and head[0]["probes"][0]["device"] == "cpu"
    assert {w["node_id"] for w in workers} == {t4_cluster.nodes[1], t4_cluster.nodes[2]}
    for n in nodes:
        assert n["ok"] is True
        # one probe per GPU (else one), each on the node it was pinned to
        assert len(n["probes"]) == max(1, int(n["gpus"]))
        assert all(p["node_id"] == n["node_id"] for p in n["probes"])
    for w in workers:
        assert w["accelerator"] == "T4" and w["custom"] == {"t4_worker": 1.0}
        assert w["probes"][0]["note"] == "no CUDA: ran on CPU"
    print(f"cluster check (3 nodes) took {seconds:.0f}s")


@pytest.mark.ray
def test_check_fails_naming_each_node_that_cannot(t4_cluster):
    # Without --allow-logical-gpus a GPU node where torch sees no CUDA is a failure:
    # trials sent there would silently train on the CPU.
    proc, _ = _check(t4_cluster)
    assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
    failed = [line for line in proc.stderr.splitlines() if line.startswith("FAIL ")]
    assert len(failed) == 2
    for index in (1, 2):
        short = t4_cluster.nodes[index][:8]
        line = next(line for line in failed if short in line)
        assert "(worker)" in line and "sees no CUDA device" in line
    assert t4_cluster.nodes[0][:8] not in "\n".join(failed)
    assert "2 of 3 node(s) cannot run 4-bit QLoRA" in proc.stderr
    assert "GPUs by type: T4 x2" in proc.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_check_with_a_wrong_token_says_so(t4_cluster):
    env = t4_cluster.env()
    env["RAY_AUTH_TOKEN"] = "not-the-token"
    proc, _ = _check(t4_cluster, env=env, timeout=180)
    assert proc.returncode == 2
    assert "cannot connect to Ray" in proc.stderr and "InvalidAuthToken" in proc.stderr


def test_check_unreachable_address_fails_fast():
    """The address is probed before Ray is asked to connect (Ray would retry for minutes): the
    error names it. The subprocess timeout only guards against a hang; speed is not asserted."""
    proc = subprocess.run([*CLI, "cluster", "check", "127.0.0.1:9"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "nothing answers at 127.0.0.1:9" in proc.stderr
