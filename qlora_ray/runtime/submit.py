"""``submit``: run (or resume) a spec's experiment in the foreground and return its outcome.

Connect, check that one trial fits, record the plan, measure the base model once, run the
grid of unfinished trials, write the leaderboard. Resuming is ours, not Tune's: trials whose
``status.json`` says finished are skipped, the rest run under the same Train run names, so
Ray Train restores each from its last reported checkpoint. ``--fresh`` moves the old folder aside.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

from qlora_ray import layout, results
from qlora_ray.budget import TIME_BUDGET, Deadline
from qlora_ray.lock import experiment_lock
from qlora_ray.plan import expand
from qlora_ray.runtime import experiment, faults
from qlora_ray.runtime.baseline import finish_baseline, start_baseline
from qlora_ray.runtime.capacity import check_resources, room_for_baseline
from qlora_ray.runtime.connect import ConnectOptions, connect
from qlora_ray.runtime.grid import run_grid
from qlora_ray.runtime.held_out import measure_best_on_test, unmeasured_on_test
from qlora_ray.runtime.tracking import tracking_callback
from qlora_ray.runtime.trial import Sweep
from qlora_ray.spec import load_spec
from qlora_ray.storage import Storage, write_results


@dataclass
class SubmitOutcome:
    """What a submit leaves: the leaderboard, where it is, and which trials this spec planned."""

    board: results.Leaderboard
    exp: str
    planned: List[str]

    @property
    def unfinished(self) -> List[results.TrialRow]:
        """Rows of this spec's trials that did not finish (rows an earlier, wider sweep left do not count)."""
        planned = set(self.planned)
        return [row for row in self.board.rows if row.trial_id in planned and row.status not in (results.FINISHED, results.PRUNED)]

    @property
    def out_of_time(self) -> List[results.TrialRow]:
        """Rows of this spec's trials that the time budget stopped at a checkpoint."""
        return [row for row in self.unfinished
                if row.status == results.STOPPED and (row.reason or "").startswith(TIME_BUDGET)]


def submit(spec_path: Path, overrides: List[str], console, options: ConnectOptions = ConnectOptions(),
           fresh: bool = False) -> SubmitOutcome:
    """Run (or resume) the experiment of ``spec_path`` in the foreground."""
    started = time.time()  # the time budget runs from here
    spec = load_spec(spec_path, overrides)
    trials = expand(spec)

    def say(text: str) -> None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)

    with contextlib.ExitStack() as held:
        if Storage(spec.experiment_dir).is_local_path:
            held.enter_context(experiment_lock(spec.experiment_dir, f"qlora-ray submit {spec_path}"))
        storage = experiment.open_experiment(spec, fresh, say)
        deadline = Deadline.after(spec.resources.time_budget, started)
        tracker = _run(spec, spec_path, trials, storage, options, console, say, deadline)
        board = write_results(storage.root)
        if tracker is not None and tracker.finish():
            say("tracking failed for some trials (training went on); see the leaderboard's status column")
            board = write_results(storage.root)  # the notes join the leaderboard
    return SubmitOutcome(board=board, exp=storage.root, planned=[t.id for t in trials])


def _run(spec, spec_path: Path, trials, storage: Storage, options: ConnectOptions, console, say, deadline):
    """Connect, record the plan, measure the base model and run the grid; returns the tracking
    callback (or None) so the caller can close its runs after the leaderboard is written."""
    say(f"experiment: {storage.root} ({len(trials)} trial(s))")
    todo = [t for t in trials if not experiment.is_finished(storage, t.id)]
    tracker = None
    if not todo:
        say(f"all {len(trials)} trial(s) already finished; nothing to run (use --fresh to start over)")
        if unmeasured_on_test(spec, storage):  # an earlier submit could not measure it
            with connect(options):
                measure_best_on_test(spec, storage, say)
    else:
        with connect(options) as cluster:
            _say_where(cluster, storage, say)
            check_resources(spec, cluster)  # before anything is written: a refused spec leaves no trace
            experiment.record_experiment(storage, spec, spec_path, trials, cluster)
            # Beside the trials if a slot is left over for it, else first.
            ref = start_baseline(spec, storage, say, alongside=room_for_baseline(spec, cluster, len(todo)))
            sweep = Sweep(exp=storage.root, trials={t.id: t for t in todo},
                          baseline=storage.read_text(layout.BASELINE_FILE), baseline_ref=ref,
                          faults=faults.installed(), deadline=deadline)
            tracker = tracking_callback(spec, todo, storage.root)
            run_grid(spec, sweep, cluster, console, skipped=len(trials) - len(todo),
                     callbacks=[tracker] if tracker else [])
            finish_baseline(ref, storage, say)
            measure_best_on_test(spec, storage, say)
    return tracker


def _say_where(cluster, storage: Storage, say: Callable[[str], None]) -> None:
    for note in cluster.notes:
        say(note)
    if cluster.dashboard_url:
        say(f"Ray dashboard: {cluster.dashboard_url}  (token: `ray get-auth-token`)")
    if cluster.log_dir:
        say(f"Ray logs: {cluster.log_dir}  (worker output: worker-*.out, Ray Train: train/)")
    if len(cluster.nodes) > 1 and storage.is_local_path:
        say(f"note: trials write {storage.root} on the node they run on; on a multi-node "
            "cluster use a shared filesystem or a storage URI (output.dir=s3://...)")
