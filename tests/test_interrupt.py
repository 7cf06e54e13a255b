"""Interrupting a sweep through a REAL local Ray, and submitting it again: Ctrl-C (SIGINT to the
submit's process group, as a terminal sends it) while a trial is mid-run marks it ``stopped``
with a hint to re-submit, and the re-submit resumes it from the trial folder's checkpoint with
either runner, also when Ray's own record of the run is gone. A test-only fault plan stalls the
worker at a known step so the interrupt lands there."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_runtime import FAULTY_SUBMIT, _out, _rows, _submit  # noqa: E402

pytestmark = pytest.mark.ray


def _interrupted_submit(spec: Path, args: list, trial: Path, faults: dict) -> str:
    """Run submit with ``faults``, wait for the worker to stall, Ctrl-C it; its output."""
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    log = spec.parent / "interrupted.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(FAULTY_SUBMIT), json.dumps(faults), str(spec), *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=spec.parent,
                                start_new_session=True)
        try:
            deadline = time.time() + 400
            while not (trial / ".test-stalled").exists():
                assert proc.poll() is None and time.time() < deadline, log.read_text()
                time.sleep(0.5)
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return log.read_text(errors="replace")


@pytest.mark.parametrize("runner", ["train", pytest.param("tune", marks=pytest.mark.slow)])
def test_ctrl_c_stops_a_trial_and_a_resubmit_resumes_it(tiny_spec_file, runner):
    exp = tiny_spec_file.parent / "runs" / "tiny"
    trial = exp / "tiny"
    args = [f"resources.runner={runner}", "resources.cpus_per_trial=0.5", "--no-dashboard"]
    out = _interrupted_submit(tiny_spec_file, args, trial, {"stall_at_step": 4})

    status = json.loads((trial / "status.json").read_text())
    assert status["status"] == "stopped", (status, out)
    assert "placement group" not in (status["reason"] or "").lower(), status
    board = (exp / "leaderboard.md").read_text()
    assert "| stopped: interrupted (Ctrl-C) |" in board, board
    assert "qlora-ray submit" in board and "resume" in board, board
    kept = (trial / "metrics.jsonl").read_text().splitlines()[:3]
    assert (trial / "checkpoints" / "step_3" / "manifest.json").is_file()

    if runner == "train":
        shutil.rmtree(exp / "_ray" / "train" / "tiny")  # Ray's own record lost (moved output, new storage)
    again = _submit(tiny_spec_file, *args)
    assert again.returncode == 0, _out(again)
    starts = [e for e in _rows(trial / "events.jsonl") if e["event"] == "start"]
    assert starts[-1]["resume_from"] == str(trial / "checkpoints" / "step_3"), starts
    lines = (trial / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[:3] == kept  # the first run's rows, not a second history
    assert json.loads((trial / "status.json").read_text())["status"] == "finished"


@pytest.mark.slow  # a driver kill and a Tune retry: several minutes on a loaded 2-core machine
def test_a_killed_trial_driver_is_retried_from_its_checkpoint(tiny_spec_file):
    """SIGKILL of a trial's driver (Tune's ``ray::ImplicitFunc``, which runs the TorchTrainer) at
    step 4: Tune starts the trial again (resources.max_failures), it resumes from its step-3
    checkpoint and finishes; one history in metrics.jsonl."""
    exp = tiny_spec_file.parent / "runs" / "tiny"
    trial = exp / "tiny"
    proc = _submit(tiny_spec_file, "resources.cpus_per_trial=0.5", "--no-dashboard", faults={"kill_driver_at_step": 4},
                   timeout=900)
    assert proc.returncode == 0, _out(proc)
    assert (trial / ".test-driver-killed").exists()  # the fault did fire
    starts = [e for e in _rows(trial / "events.jsonl") if e["event"] == "start"]
    assert len(starts) == 2 and starts[0]["resume_from"] is None, starts
    assert starts[1]["resume_from"] and "checkpoint" in starts[1]["resume_from"], starts
    assert [r["step"] for r in _rows(trial / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    status = json.loads((trial / "status.json").read_text())
    assert status["status"] == "finished", status


def test_a_trial_stopped_by_ctrl_c_stays_stopped_whatever_its_dying_driver_reports(tiny_spec_file):
    """The driver stamps a running trial stopped when Tune returns after a Ctrl-C; the trial's own
    process, going down afterwards, must not turn that into a failure (nor a clean finish into a
    stop). No Ray: the records only."""
    from qlora_ray.plan import expand
    from qlora_ray.records import TrialResult
    from qlora_ray.runtime import experiment
    from qlora_ray.spec import load_spec
    from qlora_ray.storage import Storage

    trial = expand(load_spec(tiny_spec_file))[0]
    storage = Storage(str(tiny_spec_file.parent / "exp"))
    run = experiment.mark_running(storage, trial)
    experiment.mark_stopped(storage, [trial.id], interrupted=True, failed_since=experiment.now())
    status = experiment.mark_ended(storage, run, TrialResult(), "RayActorError: its placement group was removed")
    assert (status.status.value, status.reason) == ("stopped", "interrupted (Ctrl-C)")
    assert not experiment.is_finished(storage, trial.id)  # a re-submit resumes it

    run = experiment.mark_running(storage, trial)
    experiment.mark_stopped(storage, [trial.id], interrupted=True, failed_since=experiment.now())
    assert experiment.mark_ended(storage, run, TrialResult(), None).status.value == "finished"
