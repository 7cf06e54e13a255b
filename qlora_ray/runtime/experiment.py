"""The experiment folder's bookkeeping: its plan and spec, and every trial's ``status.json``.

This module is the only writer of ``status.json`` (a trial stamped running, ended, failed by
its driver crashing, or stopped when the grid ended early); the trial functions, the progress
display and the grid call it. It needs no Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from qlora_ray import layout
from qlora_ray.errors import UserError
from qlora_ray.plan import Trial
from qlora_ray.records import (ExperimentPlan, Overhead, PlannedTrial, TrialEvent, TrialResult, TrialState,
                               TrialStatus, now, parse_lines)
from qlora_ray.runtime.capacity import Cluster
from qlora_ray.spec import JobSpec, to_yaml
from qlora_ray.storage import Storage

log = logging.getLogger(__name__)

# Keys of the spec that may change between submissions of one experiment.
MUTABLE_KEYS = ("sweep", "resources", "output", "search", "results", "tracking")


def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def spec_changes(old_yaml: str, spec: JobSpec) -> List[str]:
    """Keys (outside sweep/resources/output) whose values differ from the saved spec."""
    import yaml

    old = _flat(yaml.safe_load(old_yaml) or {})
    new = _flat(yaml.safe_load(to_yaml(spec)) or {})
    changed = []
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in MUTABLE_KEYS or old.get(key) == new.get(key):
            continue
        changed.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changed


def open_experiment(spec: JobSpec, fresh: bool, say: Callable[[str], None]) -> Storage:
    """The experiment folder, the old one moved aside if ``fresh``; a changed spec is refused."""
    storage = Storage(spec.experiment_dir)
    if fresh:
        moved = storage.move_aside()
        if moved:
            say(f"--fresh: moved the previous experiment to {moved}")
    saved = storage.read_text(layout.SPEC_FILE)
    changes = spec_changes(saved, spec) if saved is not None else []
    if changes:
        raise UserError(
            f"experiment '{spec.name}' in {storage.root} was run with a different spec:\n  "
            + "\n  ".join(changes[:12]) + ("\n  ..." if len(changes) > 12 else "")
            + "\nRe-submit with --fresh to start over (the old folder is kept), or give the job "
              "another name (name=...).")
    return storage


def record_experiment(storage: Storage, spec: JobSpec, spec_path: Path, trials: List[Trial],
                      cluster: Optional[Cluster]) -> None:
    """``spec.yaml`` and ``experiment.json`` (the plan, for results; where Ray's logs are)."""
    storage.write_text(layout.SPEC_FILE, to_yaml(spec))
    plan = storage.read_record(ExperimentPlan, layout.EXPERIMENT_FILE) or ExperimentPlan(name=spec.name, created=now())
    known = {t.id: t for t in plan.trials}
    known.update({t.id: PlannedTrial(id=t.id, values=t.values) for t in trials})
    # The trials' keys (train.seed too, with search.seeds), not only the sweep's.
    keys = list(trials[0].values) if trials else list(spec.sweep)
    plan.name, plan.spec_file, plan.sweep_keys = spec.name, str(spec_path), keys
    plan.trials, plan.updated, plan.submits = list(known.values()), now(), plan.submits + 1
    plan.select = dataclasses.asdict(spec.results)
    if cluster is not None:
        plan.address, plan.dashboard, plan.ray_logs = cluster.address, cluster.dashboard_url, cluster.log_dir
    storage.write_record(layout.EXPERIMENT_FILE, plan)


def reason(error: object) -> str:
    """One line a leaderboard can show from an error (or its text): its innermost error's last line."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line or "Exception" in line:
            return line[:300]
    return (lines[-1] if lines else type(error).__name__)[:300]


def trial_status(storage: Storage, trial_id: str) -> Optional[TrialStatus]:
    return storage.read_record(TrialStatus, layout.trial_file(trial_id, layout.STATUS_FILE))


def is_finished(storage: Storage, trial_id: str) -> bool:
    status = trial_status(storage, trial_id)
    return status is not None and status.status.done


def mark_pruned(storage: Storage, trial_id: str, step: Optional[int], eval_ppl: Optional[float],
                by: str) -> Optional[TrialStatus]:
    """Stamp a trial the sweep's scheduler stopped (its process is gone, so it never stamped its
    end): pruned at ``step`` with its last periodic eval perplexity. One that ended on its own keeps that."""
    status = trial_status(storage, trial_id)
    if status is None or status.status.ended:
        return status
    ended = time.time()
    status.status, status.ended_at = TrialState.PRUNED, now()
    status.pruned_step, status.pruned_eval_ppl = step, eval_ppl
    status.reason = f"stopped by {by} at step {step}"
    if status.started_at:
        started = datetime.fromisoformat(status.started_at).timestamp()
        status.trial_wall_s = round(ended - started + (status.trial_wall_s or 0.0), 2)
    status.attempts = count_starts(storage, trial_id)
    _write(storage, status)
    return status


def _write(storage: Storage, status: TrialStatus) -> None:
    storage.write_record(layout.trial_file(status.trial_id, layout.STATUS_FILE), status)


@dataclass
class TrialRun:
    """One run of a trial as its driver sees it: the status being kept and when it started."""

    status: TrialStatus
    started: float
    prior_wall_s: float  # wall time of earlier submits that were cut short


def mark_running(storage: Storage, trial: Trial) -> TrialRun:
    """Stamp a trial running for this submit; forget the last run's outcome (only this run's counts)."""
    before = trial_status(storage, trial.id)
    status = TrialStatus(trial_id=trial.id, values=trial.values, status=TrialState.RUNNING,
                         submits=(before.submits if before else 0) + 1, started_at=now(),
                         total_steps=trial.spec.train.max_steps)
    _write(storage, status)
    storage.delete(layout.trial_file(trial.id, layout.RESULT_FILE))
    return TrialRun(status, time.time(), (before.trial_wall_s if before else None) or 0.0)


def mark_ended(storage: Storage, run: TrialRun, result: Optional[TrialResult], error: Optional[str]) -> TrialStatus:
    """Stamp a run's end: finished, or failed with ``error``; wall time summed over submits (an
    earlier one may have been cut short) and the split of this run's time outside ``fit``. A trial
    the scheduler pruned meanwhile stays pruned; one the driver stopped meanwhile stays stopped
    unless it finished."""
    ended, started, status = time.time(), run.started, run.status
    current = trial_status(storage, status.trial_id)
    if current is not None and (current.status == TrialState.PRUNED
                                or (error and current.status == TrialState.STOPPED)):
        # The scheduler pruned it, or the driver stopped it (Ctrl-C) while it ran: its process is
        # going down, and whatever its trial function saw on the way (its TorchTrainer's
        # controller gone) is not the trial's outcome.
        return current
    status.trial_wall_s = round(ended - started + run.prior_wall_s, 2)
    timing = result.timing if result else None
    if timing is not None:
        # Ray starting the worker, the worker's imports and resume, Ray tearing it down
        # (retries fold into the first and last).
        status.overhead = Overhead(worker_start_s=round(timing.worker_entered - started, 2),
                                   worker_setup_s=round(timing.fit_started - timing.worker_entered, 2),
                                   teardown_s=round(ended - timing.fit_ended, 2))
    status.status = TrialState.FAILED if error else TrialState.FINISHED
    status.reason, status.ended_at = error, now()
    if not error and result is not None and result.stopped:  # at a checkpoint; a re-submit resumes it
        status.status, status.reason = TrialState.STOPPED, result.stopped
    status.attempts = count_starts(storage, status.trial_id)
    _write(storage, status)
    return status


def mark_failed(storage: Storage, trial_id: str, reason: str) -> TrialStatus:
    """Stamp a trial whose Tune trial errored: failed, with ``reason``. A trial that had already
    ended (finished or failed, stamped by its own function) keeps that."""
    status = trial_status(storage, trial_id) or TrialStatus(trial_id=trial_id)
    if status.status.ended:
        return status
    status.status, status.reason, status.ended_at = TrialState.FAILED, reason, now()
    status.attempts = count_starts(storage, trial_id)
    try:
        _write(storage, status)
    except OSError as e:  # a full disk, say: the progress line still says why
        log.warning("cannot stamp %s failed: %s", trial_id, e)
    return status


# A terminal's Ctrl-C reaches the trial's Ray processes too, which can tear its TorchTrainer down
# and stamp the trial failed. The driver notes the moment in its SIGINT handler, which Python runs
# only when the driver's main thread next runs bytecode (a busy machine delays it): a failure
# stamped up to this long before the noted moment (records keep whole seconds) was the Ctrl-C's.
INTERRUPT_SLACK_S = 10.0


def _seconds_before(stamp: Optional[str], reference: str) -> float:
    """How many seconds ``stamp`` (a records.now() timestamp) lies before ``reference`` (inf if unset)."""
    if not stamp:
        return float("inf")
    return (datetime.fromisoformat(reference) - datetime.fromisoformat(stamp)).total_seconds()


def mark_stopped(storage: Storage, trial_ids: List[str], interrupted: bool,
                 failed_since: Optional[str] = None) -> None:
    """A trial still marked running after the grid ended (Ctrl-C, a dead driver) is stopped;
    the next submit resumes it from its checkpoint. ``interrupted`` (Ctrl-C): so is a trial
    stamped failed after, or within INTERRUPT_SLACK_S before, ``failed_since`` (when the
    interrupt was seen)."""
    for trial_id in trial_ids:
        status = trial_status(storage, trial_id)
        if status is None:
            continue
        cut_off = (interrupted and failed_since is not None and status.status == TrialState.FAILED
                   and _seconds_before(status.ended_at, failed_since) <= INTERRUPT_SLACK_S)
        if status.status == TrialState.RUNNING or cut_off:
            status.status, status.ended_at = TrialState.STOPPED, now()
            status.reason = "interrupted (Ctrl-C)" if interrupted else "ended without a result"
            _write(storage, status)


def count_starts(storage: Storage, trial_id: str) -> Optional[int]:
    """How many times a worker started on the trial (its ``events.jsonl``), or None before any."""
    text = storage.read_text(layout.trial_file(trial_id, layout.EVENTS_FILE))
    if not text:
        return None
    return sum(1 for event in parse_lines(TrialEvent, text) if event.event == "start")
