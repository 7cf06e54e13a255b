"""Resources a run gives back, and bounded waits for the ones the driver needs.

A trial a scheduler stops ends with its Tune process; its TorchTrainer controller dies with it
and leaves the worker group's placement group (a trial's CPUs and GPUs) reserved until the
driver exits. On a cluster one trial fills, the next trial and the driver's own tasks (base
model, test set) would wait for it forever. :class:`ReleaseOrphans` frees such groups while the
grid runs; :func:`run_reserved` runs a driver task only once its resources are reserved, and
ends with an error naming them when they do not come.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Dict, List, Optional

import ray
from ray import tune
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from qlora_ray.cluster import ACCELERATOR_PREFIX
from qlora_ray.errors import UserError
from qlora_ray.runtime import ray_compat
from qlora_ray.spec import ResourcesSpec

log = logging.getLogger(__name__)

# How long the driver waits for a task's resources before it gives up with a message. Ray Train
# gives a trial 60 s a try; the driver's tasks come once per submit and get longer.
RESOURCE_WAIT_S = 300.0
POLL_S = 1.0


class ResourcesUnavailable(UserError):
    """The cluster never had the resources a driver task asks for within the wait."""


def release_orphans() -> int:
    """Remove this job's placement groups whose creating actor is dead; returns how many."""
    try:
        groups = ray_compat.orphaned_placement_groups()
    except Exception as e:  # a GCS hiccup (or a Ray Client connection): the next poll tries again
        log.debug("placement group check failed: %s", e)
        return 0
    removed = 0
    for group in groups:
        with contextlib.suppress(Exception):  # removed meanwhile (Ray Train's own cleaner won)
            remove_placement_group(group)
            removed += 1
    return removed


class ReleaseOrphans(tune.Callback):
    """Frees the placement groups of dead Train controllers (trials a scheduler stopped) about
    once a second while the grid runs, so the next trial's worker gets its resources."""

    def __init__(self, every_s: float = POLL_S):
        self.every_s, self.last, self.released = every_s, 0.0, 0

    def on_step_begin(self, iteration: int, trials: List[Any], **info: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        self.released += release_orphans()


def task_request(res: ResourcesSpec) -> Dict[str, float]:
    """What a driver task placed like a trial asks for, as Ray resource names (zeros left out)."""
    request = {"CPU": float(res.cpus_per_trial), "GPU": float(res.gpus_per_trial)}
    if res.accelerator_type:
        request[f"{ACCELERATOR_PREFIX}{res.accelerator_type}"] = 0.001
    return {k: v for k, v in request.items() if v > 0}


def task_options(res: ResourcesSpec) -> Dict[str, Any]:
    """Ray task options placing a driver task like a trial (one retry)."""
    options: Dict[str, Any] = {"num_cpus": res.cpus_per_trial, "num_gpus": res.gpus_per_trial, "max_retries": 1}
    if res.accelerator_type:
        options["accelerator_type"] = res.accelerator_type
    return options


def _amounts(request: Dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in request.items() if not k.startswith(ACCELERATOR_PREFIX)) or "nothing"


def _cluster_has(request: Dict[str, float]) -> str:
    free, total = ray.available_resources(), ray.cluster_resources()
    return ", ".join(f"{free.get(k, 0):g} of {total.get(k, 0):g} {k} free" for k in request
                     if not k.startswith(ACCELERATOR_PREFIX))


def _reserve(request: Dict[str, float], what: str, say: Callable[[str], None], wait_s: float):
    """A placement group holding ``request``, ready; or ResourcesUnavailable after ``wait_s``."""
    group = placement_group([request])
    deadline = time.monotonic() + wait_s
    said = False
    while not group.wait(timeout_seconds=POLL_S):
        release_orphans()
        if time.monotonic() >= deadline:
            has = _cluster_has(request)
            remove_placement_group(group)
            raise ResourcesUnavailable(
                f"{what}: could not get its resources ({_amounts(request)}) in {wait_s:.0f} s; the Ray cluster "
                f"has {has}. Something else holds them (another job on this Ray, or a task that did not "
                "end): free them, or lower resources.cpus_per_trial / resources.gpus_per_trial, then submit "
                "again (finished trials are kept).")
        if not said:
            say(f"{what}: waiting for its resources ({_amounts(request)}; {_cluster_has(request)}), "
                f"at most {wait_s:.0f} s ...")
            said = True
    return group


def run_reserved(fn: Callable[..., Any], args: tuple, res: ResourcesSpec, what: str,
                 say: Callable[[str], None], wait_s: Optional[float] = None) -> Any:
    """Run ``fn(*args)`` as a Ray task placed like a trial and return its result; its resources
    are reserved first, for at most ``wait_s`` (ResourcesUnavailable, naming ``what``, after that),
    so the driver never waits in silence for resources that are not coming."""
    request, options = task_request(res), task_options(res)
    if not request:  # asks for nothing: nothing to wait for
        return ray.get(ray.remote(fn).options(**options).remote(*args))
    group = _reserve(request, what, say, RESOURCE_WAIT_S if wait_s is None else wait_s)
    try:
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
        return ray.get(ray.remote(fn).options(scheduling_strategy=strategy, **options).remote(*args))
    finally:
        remove_placement_group(group)
