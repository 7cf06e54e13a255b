"""The base model, measured once per experiment as a Ray task placed like a trial.

Its figures (perplexity, replies to the prompts) become ``<exp>/baseline.json``. When the
cluster has room beside the trials the task runs alongside them and each trial takes its
figures at the end if they are ready (it never waits: the task may be queued behind the
trials for a GPU); else it runs first.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import ray

from qlora_ray import layout
from qlora_ray.errors import UserError
from qlora_ray.records import Baseline
from qlora_ray.runtime.experiment import reason
from qlora_ray.runtime.placement import run_reserved, task_options
from qlora_ray.runtime.ray_compat import task_error_cause
from qlora_ray.spec import JobSpec
from qlora_ray.storage import Storage


def _baseline_task(spec: JobSpec) -> str:
    from qlora_ray import evaluate

    return evaluate.baseline(spec).to_json()


def start_baseline(spec: JobSpec, storage: Storage, say: Callable[[str], None],
                   alongside: bool) -> Optional[ray.ObjectRef]:
    """Measure the base model once, as a Ray task placed like a trial. ``alongside``: the
    cluster has room for it beside the trials (``finish_baseline`` saves its figures); else it
    runs now. Returns the running task, or None when the figures are already saved."""
    if storage.exists(layout.BASELINE_FILE):
        return None
    if alongside:
        say("baseline: measuring the base model once (perplexity, sample replies), alongside the trials ...")
        return ray.remote(_baseline_task).options(**task_options(spec.resources)).remote(spec)
    say("baseline: measuring the base model once (perplexity, sample replies) ...")
    start = time.time()
    try:
        # Resources reserved first, for a bounded time: a cluster that never frees them ends the
        # submit with a message instead of a silent wait.
        text = run_reserved(_baseline_task, (spec,), spec.resources, "baseline (the base model's figures)", say)
    except ray.exceptions.RayTaskError as e:
        # The same model and data feed every trial: stop here, with the reason, not a traceback.
        raise UserError("measuring the base model failed, so no trial was started: "
                        f"{reason(task_error_cause(e))}") from None
    storage.write_text(layout.BASELINE_FILE, text)
    say(f"baseline: done in {time.time() - start:.0f}s -> {storage.uri(layout.BASELINE_FILE)}")
    return None


def finish_baseline(ref: Optional[ray.ObjectRef], storage: Storage, say: Callable[[str], None]) -> None:
    """Save the figures of the task that ran alongside the trials as ``baseline.json``. If it
    failed or had not finished (the trials then measured the base model themselves), say so
    and go on: the leaderboard takes each trial's own base figures."""
    if ref is None:
        return
    if not ray.wait([ref], timeout=0)[0]:
        ray.cancel(ref, force=True)
        say("baseline: not done when the trials ended (no room for it?); each trial measured the base model itself")
        return
    try:
        text = ray.get(ref)
    except ray.exceptions.RayError as e:
        cause = task_error_cause(e)
        why = reason(cause)
        if not why.startswith(type(cause).__name__):
            why = f"{type(cause).__name__}: {why}"
        say(f"baseline: measuring the base model failed ({why}); each trial measured it itself")
        return
    storage.write_text(layout.BASELINE_FILE, text)
    say(f"baseline: saved {storage.uri(layout.BASELINE_FILE)}")


def base_figures(ref: Optional[ray.ObjectRef]) -> Optional[Callable[[], Optional[Baseline]]]:
    """For ``train.RunContext.base_figures``: the base-model task's figures if it has finished by
    the time a trial asks, else None (the trial measures them itself rather than wait)."""
    if ref is None:
        return None

    def figures() -> Optional[Baseline]:
        if not ray.wait([ref], timeout=0)[0]:
            return None
        try:
            return Baseline.from_json(ray.get(ref))
        except ray.exceptions.RayError:
            return None
    return figures
