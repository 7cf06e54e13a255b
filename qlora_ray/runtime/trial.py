"""One trial at the Ray boundary: the Tune trial function, its TorchTrainer, and the loop that
runs ``train.fit`` in the Ray Train worker (or in the Tune trial itself with ``runner: tune``).

What crosses into Ray is typed: a :class:`Sweep` shipped once through the object store, and for
each trial a :class:`TrialConfig` bound to the worker loop.

    run_trial (a Tune trial on the head node)
      -> TorchTrainer(one worker, FailureConfig)   or, runner tune, right here
         -> train_trial -> train.fit(spec, report, RunContext(trial_dir, resume_from, baseline))
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import ray
import ray.train
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from qlora_ray import layout
from qlora_ray.budget import Deadline
from qlora_ray.errors import UserError, disk_full_errno
from qlora_ray.plan import Trial
from qlora_ray.records import Baseline, Timing, TrialEvent, TrialResult, now, to_line
from qlora_ray.runtime import experiment, ray_compat
from qlora_ray.runtime.baseline import base_figures
from qlora_ray.runtime.faults import NO_FAULTS, FaultPlan
from qlora_ray.runtime.metrics import TrialGauges
from qlora_ray.storage import Storage


@dataclass(frozen=True)
class TrialSession:
    """Where a trial's last checkpoint comes from and where its reports go."""

    get_checkpoint: Callable[[], Optional[ray.train.Checkpoint]]
    report: Callable[..., None]


TRAIN_SESSION = TrialSession(ray.train.get_checkpoint, ray.train.report)  # runner train: the Train worker
TUNE_SESSION = TrialSession(tune.get_checkpoint, tune.report)             # runner tune: the Tune trial


@dataclass(frozen=True)
class TrialConfig:
    """What one trial's worker needs."""

    trial: Trial
    exp: str
    baseline: Optional[str] = None                  # the base figures (JSON) an earlier submit saved
    baseline_ref: Optional[ray.ObjectRef] = None    # else the base-model task running alongside
    faults: FaultPlan = NO_FAULTS
    deadline: Optional[Deadline] = None             # the submit's time budget


@dataclass
class Sweep:
    """What every trial function needs; shipped once through the object store."""

    exp: str
    trials: Dict[str, Trial]
    baseline: Optional[str] = None
    baseline_ref: Optional[ray.ObjectRef] = None
    faults: FaultPlan = NO_FAULTS
    deadline: Optional[Deadline] = None

    def config(self, trial_id: str) -> TrialConfig:
        return TrialConfig(trial=self.trials[trial_id], exp=self.exp, baseline=self.baseline,
                           baseline_ref=self.baseline_ref, faults=self.faults, deadline=self.deadline)


# ---------------------------------------------------------------- the worker

def _stage(storage: Storage, trial: Trial) -> Path:
    """The folder the trial writes: its own folder when the experiment is a path; for a URI a
    local staging folder (uploaded after every report) that starts from what storage holds
    (a restarted worker may be on another node)."""
    if storage.is_local_path:
        trial_dir = Path(storage.path(trial.id))
    else:
        trial_dir = Path(tempfile.gettempdir()) / layout.STAGING_DIR / trial.spec.name / trial.id
        shutil.rmtree(trial_dir, ignore_errors=True)
        storage.download(trial_dir, rel=trial.id)
    trial_dir.mkdir(parents=True, exist_ok=True)
    return trial_dir


class _Reporter:
    """The ``report`` callable ``fit`` gets: to Ray (with the checkpoint), then storage."""

    def __init__(self, config: TrialConfig, session: TrialSession, storage: Storage, trial_dir: Path):
        self.config, self.session, self.storage, self.trial_dir = config, session, storage, trial_dir
        self.gauges = TrialGauges(config.trial.id, config.trial.spec.name)

    def __call__(self, metrics: Dict[str, Any], checkpoint_dir: Optional[str] = None) -> None:
        self.config.faults.at_step(metrics.get("step"), self.trial_dir)
        self.gauges.update(metrics)
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # A scheduler reads a key that is present as a number: steps without an eval leave
        # eval_ppl out rather than sending None.
        self.session.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint)
        self.sync(full=False)
        self.config.faults.after_report(metrics.get("step"), self.trial_dir)

    def sync(self, full: bool) -> None:
        """For a URI: the trial's files (``full``) or just its growing logs, to storage."""
        if self.storage.is_local_path:
            return
        trial_id = self.config.trial.id
        if full:
            self.storage.upload(self.trial_dir, trial_id)
            return
        for name in (layout.METRICS_FILE, layout.EVENTS_FILE):
            if (self.trial_dir / name).exists():
                self.storage.write_text(layout.trial_file(trial_id, name),
                                        (self.trial_dir / name).read_text(encoding="utf-8"))


def _log_start(trial_dir: Path, resume_from: Optional[str]) -> None:
    event = TrialEvent(event="start", time=now(), pid=os.getpid(), host=socket.gethostname(),
                       node_id=ray.get_runtime_context().get_node_id(),
                       cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), resume_from=resume_from)
    with open(trial_dir / layout.EVENTS_FILE, "a", encoding="utf-8") as f:
        f.write(to_line(event))


def train_trial(config: TrialConfig, session: TrialSession = TRAIN_SESSION) -> None:
    """Runs in the Ray Train worker (or the Tune trial itself, runner tune): resume from the
    last checkpoint, ``train.fit``, then the outcome to ``result.json``."""
    entered = time.time()
    from qlora_ray import train

    trial, storage = config.trial, Storage(config.exp)
    trial_dir = _stage(storage, trial)
    reporter = _Reporter(config, session, storage, trial_dir)
    checkpoint = session.get_checkpoint()
    outcome = TrialResult()
    with (checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)) as resume_from:
        if resume_from is None:
            # Ray has none (runner tune after a re-submit; Ray's own state moved or lost): the
            # trial folder's newest sound checkpoint, as `qlora-ray train` resumes.
            local = train.latest_checkpoint(trial_dir)
            resume_from = str(local) if local is not None else None
        _log_start(trial_dir, resume_from)
        baseline = Baseline.from_json(config.baseline) if config.baseline else None
        fit_started = time.time()
        gpus = trial.spec.resources.gpus_per_trial
        try:
            outcome.final = train.fit(trial.spec, reporter, train.RunContext(
                trial_dir=str(trial_dir), resume_from=resume_from, baseline=baseline,
                base_figures=None if baseline else base_figures(config.baseline_ref),
                gpu_memory_fraction=gpus if 0 < gpus < 1 else None,
                should_stop=config.deadline.should_stop if config.deadline else None))
        except train.Stopped as e:  # at a checkpoint it reported: the next submit resumes there
            outcome.stopped = str(e)
        except (UserError, train.NonFiniteLossError, train.OutOfMemory) as e:
            # Deterministic: a retry would fail the same way. End the run with the reason instead
            # of raising (which would make Ray Train restart the worker max_failures times).
            outcome.error = f"{type(e).__name__}: {e}"
    outcome.timing = Timing(worker_entered=entered, fit_started=fit_started, fit_ended=time.time())
    if outcome.final is not None:
        reporter.gauges.final(outcome.final.eval_ppl)
    try:
        reporter.sync(full=True)
        # Train's Result carries the metrics of the last *checkpoint*; the trial function needs the
        # outcome itself, so it travels through storage (the final figures are stored only here).
        storage.write_record(layout.trial_file(trial.id, layout.RESULT_FILE), outcome)
    except OSError as e:
        if disk_full_errno(e) is None:
            raise
        # A retry would meet the same full disk: end here; the trial function finds no outcome
        # and says why (``_missing_outcome``).
        print(f"qlora-ray: cannot record the outcome of {trial.id}: {e}", file=sys.stderr, flush=True)


def _torch_trainer(config: TrialConfig, storage: Storage):
    """The trial's TorchTrainer: one worker with the trial's resources, restarted by Train."""
    # Imported here, in the trial's process: it pulls in torch, which the driver never needs.
    from ray.train.torch import TorchConfig, TorchTrainer

    trial = config.trial
    res = trial.spec.resources
    per_worker = {"CPU": res.cpus_per_trial}
    if res.gpus_per_trial:
        per_worker["GPU"] = res.gpus_per_trial
    return TorchTrainer(
        functools.partial(train_trial, config),
        # One worker needs no collective ops: gloo runs anywhere, including hosts whose "GPUs"
        # are logical labels (CI, the multi-node tests), where NCCL would fail to initialize.
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=res.gpus_per_trial > 0, resources_per_worker=per_worker,
            accelerator_type=res.accelerator_type),
        run_config=ray.train.RunConfig(
            name=trial.id, storage_path=storage.uri(layout.RAY_TRAIN_DIR),
            # controller_failure_limit: Train retries a worker group that cannot start (its resources
            # never come) without end by default; a finite budget ends the trial with that reason.
            failure_config=ray.train.FailureConfig(max_failures=res.max_failures,
                                                   controller_failure_limit=res.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()]),
    )


# ---------------------------------------------------------------- the Tune trial function

def trial_resources_text(res) -> str:
    """What one trial's worker asks for, as a user reads it."""
    parts = [f"{res.cpus_per_trial:g} CPU"]
    if res.gpus_per_trial:
        parts.append(f"{res.gpus_per_trial:g} GPU" + (f" {res.accelerator_type}" if res.accelerator_type else ""))
    return ", ".join(parts)


def _missing_outcome(storage: Storage, trial: Trial) -> str:
    """Why a trial ended without ``result.json``: a full disk where it writes, when that is so."""
    why = "training ended without a final report"
    if storage.is_local_path:
        folder = Path(storage.path(trial.id))
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < 1 << 20:
                return (f"DiskFullError: {why}: no space left on device under {folder}: free space there or "
                        "point output.dir elsewhere")
    return why


def run_trial(params: Dict[str, Any], sweep: Sweep) -> None:
    """One Tune trial: fit it (in its TorchTrainer, or right here with runner tune); its status
    stamped through ``experiment``; its end reported to Tune for the progress display."""
    config = sweep.config(params["trial_id"])
    trial, storage = config.trial, Storage(sweep.exp)
    run = experiment.mark_running(storage, trial)
    config.faults.at_trial_start(trial.id, Path(storage.path(trial.id)) if storage.is_local_path else None)
    result: Optional[TrialResult] = None
    try:
        if trial.spec.resources.runner == "tune":
            train_trial(config, TUNE_SESSION)
        else:
            _torch_trainer(config, storage).fit()
        result = storage.read_record(TrialResult, layout.trial_file(trial.id, layout.RESULT_FILE))
        error = None if result and (result.final or result.stopped) else (result and result.error) or \
            _missing_outcome(storage, trial)
    except Exception as e:  # TrainingFailedError after max_failures retries, or a controller error
        if trial.spec.resources.runner == "tune":
            raise  # Tune restarts the trial from its last checkpoint (resources.max_failures times)
        error = experiment.reason(e)
        if "startup timed out" in str(e):
            # Not the trial's fault: a failed trial is not done, so the next submit runs it again.
            error = (f"could not get its resources ({trial_resources_text(trial.spec.resources)}) in "
                     f"{trial.spec.resources.max_failures + 1} tries of {ray_compat.worker_start_timeout_s():g} s "
                     "(the cluster was full); not trained: submit again to run it")
    status = experiment.mark_ended(storage, run, result, error)
    final = result.final if result else None
    tune.report({"trial_state": status.status.value, "reason": status.reason or "",
                 "eval_ppl": final.eval_ppl if final else None})
