"""The experiment trackers under ``submit``: a Tune callback in the submitting process feeds each
trial's reported steps and final figures to a :class:`~qlora_ray.tracking.Tracker`; once the
leaderboard is written, :meth:`TrackingCallback.finish` adds it to every run and closes them.

Ray's own logger callbacks (MLflow, W&B, TensorBoard) log Tune's trial config, which here is only
a trial id; this callback logs the resolved spec instead, through the same tracker that
``qlora-ray train`` uses.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from ray import tune

from qlora_ray import layout
from qlora_ray.plan import Trial
from qlora_ray.records import TrackingNote, TrialResult, TrialStatus
from qlora_ray.spec import JobSpec
from qlora_ray.storage import Storage
from qlora_ray.tracking import Tracker, wanted


class TrackingCallback(tune.Callback):
    """One tracker run per Tune trial: opened at its first report, ended at ``finish``."""

    def __init__(self, spec: JobSpec, trials: List[Trial], exp: str):
        self.trials: Dict[str, Trial] = {t.id: t for t in trials}
        self.exp = exp
        storage = Storage(exp)
        # File-based trackers write next to the trials; for a URI into a local folder uploaded at the end.
        self.local = Path(storage.path()) if storage.is_local_path else \
            Path(tempfile.gettempdir()) / layout.STAGING_DIR / spec.name / "tracking"
        self.tracker = Tracker(spec, self.local)
        self.started: List[str] = []

    def __getstate__(self):
        # Tune pickles its callbacks into the experiment state; tracker clients and writers hold
        # sockets and files, and a resumed experiment is a new submit with a new callback anyway.
        return {k: v for k, v in self.__dict__.items() if k != "tracker"}

    def __setstate__(self, state):
        self.__dict__.update(state, tracker=None)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid = trial.config["trial_id"]
        if tid not in self.started:
            self.started.append(tid)
            self.tracker.start(tid, self.trials[tid].spec)
        if "trial_state" in result:  # the trial function's last report: its outcome is in storage
            self._final(tid)
        else:
            self.tracker.log_step(tid, result)

    def _final(self, tid: str) -> None:
        storage = Storage(self.exp)
        outcome = storage.read_record(TrialResult, layout.trial_file(tid, layout.RESULT_FILE))
        if outcome is not None and outcome.final is not None:
            samples = _local_copy(storage, layout.trial_file(tid, layout.SAMPLES_FILE))
            self.tracker.log_final(tid, outcome.final, samples)

    def finish(self) -> bool:
        """Add the leaderboard to every run, end the runs with their trial's status, and note what
        failed in each trial's ``tracking.json``; True when a failure was noted."""
        storage = Storage(self.exp)
        board = [p for p in (_local_copy(storage, layout.leaderboard_file(s)) for s in ("md", "csv"))
                 if p is not None]
        for tid in self.started:
            self.tracker.log_artifact(tid, board)
            status = storage.read_record(TrialStatus, layout.trial_file(tid, layout.STATUS_FILE))
            self.tracker.end(tid, status.status.value if status else "stopped")
        if not storage.is_local_path and self.local.is_dir():
            storage.upload(self.local, "")
        for tid, problems in self.tracker.errors.items():
            storage.write_record(layout.trial_file(tid, layout.TRACKING_FILE), TrackingNote(errors=problems))
        return bool(self.tracker.errors)


def tracking_callback(spec: JobSpec, trials: List[Trial], exp: str) -> Optional[TrackingCallback]:
    """The callback when the spec asks for a tracker, else None."""
    return TrackingCallback(spec, trials, exp) if wanted(spec.tracking) else None


def _local_copy(storage: Storage, rel: str) -> Optional[Path]:
    """A file of the experiment as a local path (copied out of a storage URI), or None."""
    if storage.is_local_path:
        path = Path(storage.path(rel))
        return path if path.is_file() else None
    text = storage.read_text(rel)
    if text is None:
        return None
    path = Path(tempfile.mkdtemp(prefix="qlora-ray-")) / Path(rel).name
    path.write_text(text, encoding="utf-8")
    return path
