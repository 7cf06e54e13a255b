"""Test-only fault injection: one plan, installed by a test in the driver process, never read
from the environment or a file.

A test that wants a worker to die or a trial driver to crash calls :func:`install` before
running ``submit`` in its process (``tests/faulty_submit.py`` does this for a subprocess); the
driver ships the plan to every trial inside the trial config. With no plan installed (every
real run) the hooks below are no-ops.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Marks that the kill has fired in a trial folder, so the retry lives.
KILLED_MARKER = ".test-killed"
STALLED_MARKER = ".test-stalled"
DRIVER_PID_FILE = ".test-driver-pid"
DRIVER_KILLED_MARKER = ".test-driver-killed"
STALL_S = 600


@dataclass(frozen=True)
class FaultPlan:
    """What to break: the worker SIGKILLs itself at ``kill_at_step`` on its first attempt (a
    node dying: no cleanup, no report), and the trial driver of ``crash_trial`` raises after
    stamping the trial running (a trial driver crashing, which Tune marks ERROR)."""

    kill_at_step: Optional[int] = None
    crash_trial: Optional[str] = None
    # The worker stalls at this step on its first attempt (after the step's report), so a test can
    # interrupt the sweep at a known point; ``STALLED_MARKER`` in the trial folder says it is there.
    stall_at_step: Optional[int] = None
    # The worker SIGKILLs its trial driver (Tune's ``ray::ImplicitFunc``) at this step on its first
    # attempt: the driver records its pid in the trial folder when it starts (``DRIVER_PID_FILE``).
    kill_driver_at_step: Optional[int] = None
    # The worker of this trial finds an infinite training loss at its first reported step (what a
    # diverging run meets), raised as the loss check raises it: a deterministic failure, never retried.
    inf_loss_trial: Optional[str] = None

    def at_step(self, step: Optional[int], trial_dir: Path) -> None:
        """Called by the worker after each step's report is built, before it is sent."""
        if self.inf_loss_trial and step and Path(trial_dir).name == self.inf_loss_trial:
            from qlora_ray.train import NonFiniteLossError

            raise NonFiniteLossError(step, float("inf"))
        marker = Path(trial_dir) / KILLED_MARKER
        if self.kill_at_step and step == self.kill_at_step and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    def after_report(self, step: Optional[int], trial_dir: Path) -> None:
        """Called by the worker after each step's report was sent."""
        pid_file = Path(trial_dir) / DRIVER_PID_FILE
        if self.kill_driver_at_step and step == self.kill_driver_at_step and pid_file.exists() \
                and not (Path(trial_dir) / DRIVER_KILLED_MARKER).exists():
            (Path(trial_dir) / DRIVER_KILLED_MARKER).write_text(pid_file.read_text())
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
            time.sleep(STALL_S)  # this worker goes down with its driver
        marker = Path(trial_dir) / STALLED_MARKER
        if self.stall_at_step and step == self.stall_at_step and not marker.exists():
            marker.write_text(str(os.getpid()))
            time.sleep(STALL_S)

    def at_trial_start(self, trial_id: str, trial_dir: Optional[Path] = None) -> None:
        """Called by the trial driver once the trial is stamped running."""
        if self.kill_driver_at_step and trial_dir is not None:
            Path(trial_dir).mkdir(parents=True, exist_ok=True)
            (Path(trial_dir) / DRIVER_PID_FILE).write_text(str(os.getpid()))
        if self.crash_trial == trial_id:
            raise RuntimeError(f"injected fault: the trial driver of {trial_id} crashed on purpose")


NO_FAULTS = FaultPlan()
_installed: FaultPlan = NO_FAULTS


def install(plan: FaultPlan) -> None:
    """Make ``plan`` the one the next ``submit`` in this process ships to its trials (tests only)."""
    global _installed
    _installed = plan


def installed() -> FaultPlan:
    """The installed plan (:data:`NO_FAULTS` unless a test installed one)."""
    return _installed
