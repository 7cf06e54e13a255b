"""The Tune grid over a sweep's unfinished trials: one Tune trial each (``trial.run_trial``),
at most as many at once as fit, with the progress display and the status bookkeeping hooked in."""

from __future__ import annotations

import functools
from typing import List, Sequence

from ray import tune

from qlora_ray import layout
from qlora_ray.plan import Trial
from qlora_ray.records import TrialStatus, now
from qlora_ray.runtime import experiment, ray_compat
from qlora_ray.runtime.capacity import Cluster, concurrency, trial_resources
from qlora_ray.runtime.placement import ReleaseOrphans
from qlora_ray.runtime.progress import Progress
from qlora_ray.runtime.pruning import build_scheduler
from qlora_ray.runtime.trial import Sweep, run_trial
from qlora_ray.spec import JobSpec
from qlora_ray.storage import Storage


def stamp_crashed(exp: str, trial_id: str, error_text: str) -> TrialStatus:
    """A trial Tune marked ERROR (its function raised or its process died): failed, with why."""
    why = f"trial driver crashed: {experiment.reason(error_text)}" if error_text else \
        "trial driver crashed (see Ray logs)"
    return experiment.mark_failed(Storage(exp), trial_id, why)


def run_grid(spec: JobSpec, sweep: Sweep, cluster: Cluster, console, skipped: int = 0,
             callbacks: Sequence[tune.Callback] = ()) -> None:
    """Run every trial of ``sweep`` (each a TorchTrainer, or its own trainer with runner tune);
    returns when all have ended."""
    todo: List[Trial] = list(sweep.trials.values())
    limit = concurrency(spec, cluster, len(todo))
    console.print(f"running {len(todo)} trial(s), {limit} at a time"
                  + (f"; {skipped} already finished (skipped)" if skipped else ""), highlight=False)
    progress = Progress(todo, console, skipped=skipped, on_error=functools.partial(stamp_crashed, sweep.exp),
                        on_complete=functools.partial(experiment.trial_status, Storage(sweep.exp)))
    storage = Storage(sweep.exp)
    scheduler = build_scheduler(spec, sweep.exp)
    interrupt = ray_compat.InterruptWatch()
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), trial_resources(spec.resources)),
        param_space={"trial_id": tune.grid_search([t.id for t in todo])},
        tune_config=tune.TuneConfig(
            # A trial's driver process is handed to the next trial instead of a fresh one (~6 s
            # of process start and imports saved per trial after the first wave).
            # A stopped (pruned) trial's process must end, taking its TorchTrainer's controller
            # and worker with it; a reused one would be kept alive for the next trial.
            max_concurrent_trials=limit, reuse_actors=scheduler is None, scheduler=scheduler,
            trial_name_creator=lambda t: t.config["trial_id"],
            trial_dirname_creator=lambda t: t.config["trial_id"]),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=storage.uri(layout.RAY_DIR), verbose=0,
            # ReleaseOrphans: a stopped trial's worker resources come back for the next trial.
            callbacks=[progress, interrupt, ReleaseOrphans(), *callbacks],
            # Runner train: Ray Train restarts a dead worker, and the trial function ends normally
            # whatever the worker did, so a Tune retry happens only when the trial's driver itself
            # died (killed, its node lost): it resumes from the trial's checkpoint like a worker.
            failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
    )
    interrupted = True
    try:
        with ray_compat.quiet_trial_loggers(), ray_compat.env_defaults(ray_compat.REPORTER_ENV), progress:
            tuner.fit()
        interrupted = interrupt.seen
    finally:  # also after a second Ctrl-C (KeyboardInterrupt), or Tune itself failing
        # A trial cut off by Ctrl-C may have stamped itself failed (its TorchTrainer torn down
        # under it): interrupted, it is stopped, and the next submit resumes it.
        experiment.mark_stopped(storage, [t.id for t in todo], interrupted,
                                failed_since=interrupt.at or now())
