"""Cluster checks: what a Ray cluster offers, and whether every node can run 4-bit QLoRA.

``qlora-ray cluster check ADDRESS`` connects to a running cluster, lists its nodes and GPUs by
accelerator type, and sends one small task to each alive node (pinned there with
``NodeAffinitySchedulingStrategy``) that imports bitsandbytes and runs an NF4 ``Linear4bit``
forward: on CUDA where Ray lists GPUs on the node (one probe per GPU), else on the CPU. A node
that cannot is named with its error before any sweep is sent to it.

This module uses Ray Core only (never ``ray.tune``); torch and bitsandbytes are imported inside
the probe, on the node that runs it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from qlora_ray.errors import UserError

# Ray exposes a node's GPU model as a resource named like this (auto-detected on real GPUs, or
# declared by the cluster config as in runtime/*.yaml and the multi-node tests).
ACCELERATOR_PREFIX = "accelerator_type:"
ACCELERATOR_LABEL = "ray.io/accelerator-type"
HEAD_RESOURCE = "node:__internal_head__"
_HIDDEN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


@dataclass
class ProbeResult:
    """What the probe found on one device of one node."""

    ok: bool
    device: str                      # "cuda:0 (Tesla T4, sm75)" or "cpu"
    error: Optional[str] = None
    versions: Dict[str, str] = field(default_factory=dict)
    note: Optional[str] = None
    seconds: float = 0.0
    node_id: Optional[str] = None    # where it ran (Ray's node id), to confirm the pinning


@dataclass
class NodeReport:
    """One Ray node: what it offers the scheduler and what the probe found on it."""

    node_id: str
    address: str
    hostname: str
    alive: bool
    is_head: bool
    cpus: float
    gpus: float
    accelerator: Optional[str]
    custom: Dict[str, float]
    probes: List[ProbeResult] = field(default_factory=list)

    @property
    def name(self) -> str:
        """How the node is named in the table and in errors: ip, short id, role."""
        return f"{self.address} {self.node_id[:8]} ({'head' if self.is_head else 'worker'})"

    @property
    def ok(self) -> Optional[bool]:
        """True if every probe passed, False if one failed, None if the node was not checked."""
        if not self.alive or not self.probes:
            return None
        return all(p.ok for p in self.probes)

    @property
    def errors(self) -> List[str]:
        return [f"{p.device}: {p.error}" for p in self.probes if not p.ok]


@dataclass
class ClusterReport:
    address: str
    ray_version: str
    nodes: List[NodeReport]

    @property
    def alive(self) -> List[NodeReport]:
        return [n for n in self.nodes if n.alive]

    @property
    def failures(self) -> List[NodeReport]:
        return [n for n in self.alive if n.ok is False]

    @property
    def gpus_by_type(self) -> Dict[str, float]:
        """GPUs on alive nodes, keyed by accelerator type ("unknown" when the node does not say)."""
        out: Dict[str, float] = {}
        for node in self.alive:
            if node.gpus:
                key = node.accelerator or "unknown"
                out[key] = out.get(key, 0.0) + node.gpus
        return out

    def to_dict(self) -> Dict[str, Any]:
        from dataclasses import asdict

        return {"address": self.address, "ray_version": self.ray_version,
                "gpus_by_type": self.gpus_by_type,
                "nodes": [{**asdict(n), "name": n.name, "ok": n.ok} for n in self.nodes]}


# ---------------------------------------------------------------- connecting

def token_available() -> bool:
    """Whether this machine holds a Ray auth token (env var, token file, or ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return Path(path).expanduser().is_file()


def prepare_auth_env() -> None:
    """Turn on token auth for this client when a token is at hand and the mode is unset.

    Ray 2.60 enables token auth on its own only for ``ray.init()`` of a new local cluster and for
    ``address="auto"``; an explicit ``host:port`` connects without a token unless
    ``RAY_AUTH_MODE=token`` is set, and a token-protected head then refuses it. A client in
    token mode still connects to a head without auth, so turning it on is safe.
    """
    if "RAY_AUTH_MODE" not in os.environ and token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
        if "ray._raylet" in sys.modules:
            # Ray reads the mode into its C++ config at import; re-read it (as Ray itself does
            # when it turns token auth on for a local cluster).
            sys.modules["ray._raylet"].Config.initialize("")


LOOPBACK = "127.0.0.1"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(address: Optional[str]) -> bool:
    """``address`` is host:port on this machine's loopback (127.0.0.1, localhost, ::1)."""
    if not address or "://" in address:
        return False
    host = address.rpartition(":")[0].strip("[]")
    return host in _LOOPBACK_HOSTS


@contextlib.contextmanager
def loopback_node_ip(enabled: bool = True) -> Iterator[None]:
    """While ``ray.init`` runs: keep a loopback address (127.0.0.1) as it is given.

    On Linux Ray 2.60 replaces a loopback node address (``_node_ip_address="127.0.0.1"``,
    ``ray start --node-ip-address 127.0.0.1``) and a loopback cluster address with the machine's
    reachable IP (``services.resolve_ip_for_localhost``), so that other machines could join; it
    keeps loopback only where multi-node clusters are off (``ray_constants.ENABLE_RAY_CLUSTER``,
    False on macOS and Windows). For a local Ray of our own, or a cluster that lives on
    127.0.0.1, that switch is turned off for the start-up (``get_node_ip_address`` is the only
    reader there) and restored after.
    """
    try:
        from ray._private import ray_constants
    except ImportError:  # a Ray that moved it: connect as Ray would
        ray_constants = None
    if not enabled or ray_constants is None:
        yield
        return
    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at host:port (ray.init would retry for long)."""
    if address == "auto":
        return
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"address '{address}': expected auto, host:port or ray://host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UserError(
            f"cannot connect to Ray at '{address}': nothing answers at {host}:{port} ({e.strerror or e}).\n"
            "  Is the head running (ray status on it), the port right (GCS 6379, Ray Client 10001), "
            "and the port open or tunnelled (see runtime/README.md)?") from None


def _connect(address: str) -> None:
    import ray

    _reachable(address)
    prepare_auth_env()
    try:
        with loopback_node_ip(is_loopback(address)):  # else 127.0.0.1 would become this host's IP
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    except Exception as e:  # ConnectionError, AuthenticationError, RuntimeError, ValueError
        text = f"{type(e).__name__}: {e}".strip()
        token = ("a token is set here" if token_available()
                 else "no token here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
        hint = (f"\n  If the log above says InvalidAuthToken, the head uses token auth and {token}: "
                "use the head's token (ray get-auth-token on the head), see runtime/README.md.")
        raise UserError(f"cannot connect to Ray at '{address}': {text.splitlines()[0]}{hint}") from None


# ---------------------------------------------------------------- the probe (runs on each node)

def probe_4bit(use_cuda: bool, allow_cpu: bool = False) -> ProbeResult:
    """Import bitsandbytes and run an NF4 ``Linear4bit`` forward; compare with the dequantized weight.

    ``use_cuda``: Ray gave this task a GPU, so the check must run on CUDA. If CUDA is not
    usable there, that is a failure (trials would train on the CPU, ~100x slower) unless
    ``allow_cpu`` says the node's GPUs are logical labels (CI, the multi-node tests).
    """
    start = time.time()
    versions: Dict[str, str] = {}
    device = "cuda" if use_cuda else "cpu"
    node_id = None
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        node_id = sys.modules["ray"].get_runtime_context().get_node_id()
    try:
        import platform

        versions["python"] = platform.python_version()
        try:
            from importlib.metadata import version

            versions["qlora-ray"] = version("qlora-ray")
        except Exception:
            versions["qlora-ray"] = "not installed"
        import torch

        versions["torch"] = torch.__version__
        import bitsandbytes as bnb

        versions["bitsandbytes"] = bnb.__version__
        note = None
        if use_cuda and not torch.cuda.is_available():
            reason = (f"Ray lists a GPU here (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}) "
                      f"but torch {torch.__version__} sees no CUDA device "
                      f"({'a CPU-only torch build' if torch.version.cuda is None else 'no NVIDIA driver or device'})")
            if not allow_cpu:
                raise RuntimeError(reason + "; trials would train on the CPU")
            device, note = "cpu", "no CUDA: ran on CPU"
        if device == "cuda":
            index = torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(index)
            device = f"cuda:{index} ({torch.cuda.get_device_name(index)}, sm{major}{minor})"
            # T4 (sm75) has no bf16; fp16 is what quantization.compute_dtype=auto picks there.
            dtype = torch.float16
            target = f"cuda:{index}"
        else:
            dtype, target = torch.float32, "cpu"
        torch.manual_seed(0)
        layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=dtype, quant_type="nf4",
                                  compress_statistics=True)
        layer = layer.to(target)  # quantizes the weight to NF4 (double quant) on the way
        weight = layer.weight
        if weight.dtype != torch.uint8 or getattr(weight, "quant_state", None) is None:
            raise RuntimeError(f"Linear4bit weight was not quantized (dtype {weight.dtype})")
        x = torch.randn(4, 64, dtype=dtype, device=target)
        with torch.no_grad():
            y = layer(x)
            reference = x @ bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype).t()
        if y.shape != (4, 32) or not torch.isfinite(y).all():
            raise RuntimeError(f"NF4 forward gave shape {tuple(y.shape)} with non-finite values")
        err = ((y.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1e-6)).item()
        if err > 2e-2:
            raise RuntimeError(f"NF4 forward differs from the dequantized matmul by {err:.3g} (relative)")
        return ProbeResult(ok=True, device=device, versions=versions, note=note,
                           seconds=round(time.time() - start, 2), node_id=node_id)
    except Exception as e:  # the whole point is to report what broke, on which node
        message = f"{type(e).__name__}: {e}".strip().splitlines()[0][:400]
        return ProbeResult(ok=False, device=device, error=message, versions=versions,
                           seconds=round(time.time() - start, 2), node_id=node_id)


# ---------------------------------------------------------------- the check

def _node_report(raw: Dict[str, Any]) -> NodeReport:
    resources = raw.get("Resources", {}) or {}
    labels = raw.get("Labels", {}) or {}
    accel = labels.get(ACCELERATOR_LABEL)
    custom = {}
    for key, value in resources.items():
        if key.startswith(ACCELERATOR_PREFIX):
            accel = accel or key[len(ACCELERATOR_PREFIX):]
        elif key not in _HIDDEN_RESOURCES and not key.startswith("node:"):
            custom[key] = value
    return NodeReport(
        node_id=raw["NodeID"], address=raw.get("NodeManagerAddress", "?"),
        hostname=raw.get("NodeManagerHostname", "?"), alive=bool(raw.get("Alive")),
        is_head=HEAD_RESOURCE in resources, cpus=resources.get("CPU", 0.0),
        gpus=resources.get("GPU", 0.0), accelerator=accel, custom=custom)


def check_cluster(address: str = "auto", timeout_s: float = 180.0, allow_cpu: bool = False,
                  probe: bool = True) -> ClusterReport:
    """Connect to ``address`` (auto, host:port, ray://host:port), list nodes, probe each alive one.

    A node with GPUs gets one probe per GPU (each reserving ``num_gpus=1``, so it runs on the
    GPU Ray assigns); a CPU node gets one CPU probe (``num_cpus=0``, so a busy node still runs
    it). Probes that do not finish within ``timeout_s`` fail with a message saying so (a GPU
    held by a running trial, or a node still installing packages).
    """
    prepare_auth_env()  # before Ray is imported, so its config sees the mode
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if ray.is_initialized():
        raise UserError("Ray is already initialized in this process; run the check in a fresh process")
    _connect(address)
    try:
        nodes = sorted((_node_report(n) for n in ray.nodes()),
                       key=lambda n: (not n.alive, not n.is_head, n.address, n.node_id))
        if probe:
            remote_probe = ray.remote(probe_4bit)
            pending = {}
            for node in nodes:
                if not node.alive:
                    continue
                affinity = NodeAffinitySchedulingStrategy(node_id=node.node_id, soft=False)
                count = int(node.gpus) if node.gpus >= 1 else 0
                for _ in range(max(count, 1)):
                    ref = remote_probe.options(
                        num_cpus=0, num_gpus=1 if count else 0, max_retries=0,
                        scheduling_strategy=affinity).remote(count > 0, allow_cpu)
                    pending[ref] = node
            _collect(pending, timeout_s)
        return ClusterReport(address=address, ray_version=ray.__version__, nodes=nodes)
    finally:
        ray.shutdown()


def _collect(pending: Dict[Any, NodeReport], timeout_s: float) -> None:
    import ray

    deadline = time.time() + timeout_s
    refs = list(pending)
    while refs:
        done, refs = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.time()))
        for ref in done:
            try:
                result = ray.get(ref)
            except Exception as e:  # the task itself died: worker crash, unpicklable module, node lost
                text = f"{type(e).__name__}: {e}"
                if "No module named 'qlora_ray'" in text:
                    text = "qlora-ray is not installed on this node (the probe is part of it; pip install it there)"
                result = ProbeResult(ok=False, device="?", error=text.strip().splitlines()[0][:400])
            node = pending[ref]
            if result.node_id and result.node_id != node.node_id:  # hard affinity makes this a Ray bug
                result.ok, result.error = False, f"the probe ran on node {result.node_id[:8]}, not on this one"
            node.probes.append(result)
        if time.time() >= deadline:
            break
    for ref in refs:
        ray.cancel(ref, force=True)
        node = pending[ref]
        what = "a free GPU (held by a running trial?)" if node.gpus else "a worker process"
        node.probes.append(ProbeResult(
            ok=False, device="cuda" if node.gpus else "cpu",
            error=f"no result after {timeout_s:.0f}s waiting for {what}; rerun with a longer --timeout"))
