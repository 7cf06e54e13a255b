"""What a cluster can hold: pure arithmetic over its nodes' resources (no Ray calls).

A fail-fast check that one trial fits on some node (else Ray would wait forever), how many
trials fit at once, and what a Tune trial asks for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from qlora_ray.cluster import ACCELERATOR_PREFIX, HEAD_RESOURCE
from qlora_ray.errors import UserError
from qlora_ray.spec import JobSpec, ResourcesSpec

# The Tune trial function only drives a Train run; it holds no CPU (Tune refuses an empty
# request, so it asks for a sliver of the head node: drivers belong on the stable node).
DRIVER_RESOURCES = {"cpu": 0, HEAD_RESOURCE: 0.001}


@dataclass
class Cluster:
    """What the driver is connected to."""

    address: str
    embedded: bool
    dashboard_url: Optional[str]
    log_dir: Optional[str]
    nodes: List[Dict[str, Any]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # warnings for the user (a Ray others can reach)

    @property
    def resources(self) -> Dict[str, float]:
        total: Dict[str, float] = {}
        for node in self.nodes:
            for key, value in node.items():
                total[key] = total.get(key, 0.0) + value
        return total


def trial_resources(res: ResourcesSpec) -> Dict[str, float]:
    """What a Tune trial asks for: a sliver of the head node when it only drives a TorchTrainer
    (runner train), the whole trial's CPUs, GPUs and accelerator type when it trains (runner tune)."""
    if res.runner == "train":
        return dict(DRIVER_RESOURCES)
    out = {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial}
    if res.accelerator_type:
        out[f"{ACCELERATOR_PREFIX}{res.accelerator_type}"] = 0.001
    return out


def check_resources(spec: JobSpec, cluster: Cluster) -> None:
    """Fail now, naming the spec key, if no node can ever hold one trial (else Ray would wait forever)."""
    if any(_fits(node, spec) for node in cluster.nodes):
        return
    res = spec.resources
    total = cluster.resources
    kinds = sorted(k.split(":", 1)[1] for k in total if k.startswith(ACCELERATOR_PREFIX))
    where = "the local Ray (this machine)" if cluster.embedded else f"the cluster at {cluster.address}"
    problems = []
    if res.gpus_per_trial > 0 and not any(n.get("GPU", 0) >= res.gpus_per_trial for n in cluster.nodes):
        problems.append(f"resources.gpus_per_trial: {res.gpus_per_trial:g} GPU(s) per trial, but {where} has "
                        f"{total.get('GPU', 0):g} GPU(s){' in all' if len(cluster.nodes) > 1 else ''}; set "
                        "resources.gpus_per_trial=0 to train on the CPU, or pass --address of a GPU cluster")
    if res.accelerator_type and not any(n.get(f"{ACCELERATOR_PREFIX}{res.accelerator_type}") for n in cluster.nodes):
        problems.append(f"resources.accelerator_type: no node of {where} offers '{res.accelerator_type}' "
                        f"(it has: {', '.join(kinds) or 'no typed GPUs'}); drop accelerator_type or use one of those")
    if not any(n.get("CPU", 0) >= res.cpus_per_trial for n in cluster.nodes):
        most = max((n.get("CPU", 0) for n in cluster.nodes), default=0)
        problems.append(f"resources.cpus_per_trial: {res.cpus_per_trial:g} CPUs per trial, but the largest node "
                        f"of {where} has {most:g}; lower resources.cpus_per_trial")
    if not problems:
        problems.append("resources: no single node has the GPUs, CPUs and accelerator type one trial asks for "
                        f"(gpus_per_trial={res.gpus_per_trial:g}, cpus_per_trial={res.cpus_per_trial:g}, "
                        f"accelerator_type={res.accelerator_type})")
    raise UserError("\n".join(problems))


def _fits(node: Dict[str, float], spec: JobSpec, count: int = 1) -> bool:
    res = spec.resources
    ok = node.get("CPU", 0) >= res.cpus_per_trial * count and node.get("GPU", 0) >= res.gpus_per_trial * count
    if res.accelerator_type:
        ok = ok and node.get(f"{ACCELERATOR_PREFIX}{res.accelerator_type}", 0) > 0
    return ok


def slots(spec: JobSpec, cluster: Cluster, most: int) -> int:
    """How many trial-sized slots the cluster's nodes hold together, counting up to ``most``."""
    fit = 0
    for node in cluster.nodes:
        n = 0
        while _fits(node, spec, n + 1) and fit + n < most:
            n += 1
        fit += n
    return fit


def concurrency(spec: JobSpec, cluster: Cluster, n_trials: int) -> int:
    """Trials run at once: the spec's number, else how many fit on the cluster's nodes."""
    if spec.resources.max_concurrent_trials:
        return max(1, min(spec.resources.max_concurrent_trials, n_trials))
    return max(1, slots(spec, cluster, n_trials))


def room_for_baseline(spec: JobSpec, cluster: Cluster, n_trials: int) -> bool:
    """Whether a slot is left over beside the trials for the base-model task (no GPU idles while it runs)."""
    return slots(spec, cluster, n_trials + 1) > concurrency(spec, cluster, n_trials)
