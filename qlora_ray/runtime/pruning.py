"""Stopping losing trials early (``search.scheduler``): Tune's ASHA or median stopping rule on
the periodic eval perplexity that ``train`` reports every ``eval.every_steps`` steps.

A stop is Tune's: it ends the trial's process, and with it the trial's TorchTrainer controller
and worker (actors the trial's process owns). The trial therefore cannot stamp its own end; the
scheduler stamps it ``pruned`` (step and last eval perplexity) the moment it decides, through
``experiment``. The trial's adapter and checkpoint at that eval step are already on disk: an
eval step checkpoints, and the adapter is saved at every eval (``eval.keep``).
"""

from __future__ import annotations

from typing import Optional

from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule, TrialScheduler

from qlora_ray.runtime import experiment
from qlora_ray.spec import JobSpec
from qlora_ray.storage import Storage

METRIC = "eval_ppl"    # the periodic eval perplexity in a step's report
TIME_ATTR = "step"     # the optimizer step
NO_LIMIT = 10**9       # ASHA's max_t when the trial length is known only once its data is


class _Pruning:
    """Records each early stop of the scheduler it is mixed into as ``pruned`` in ``status.json``."""

    def _init_pruning(self, exp: str, name: str) -> None:
        self.exp, self.label = exp, name

    def on_trial_result(self, tune_controller, trial, result) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        step, total = result.get(TIME_ATTR), result.get("total_steps")
        if decision != TrialScheduler.STOP or step is None:
            return decision
        if total is not None and step >= total:
            # Training is over: the trial is measuring and saving its result. A stop now would
            # only lose that (a worse trial at its last step is still a finished trial).
            return TrialScheduler.CONTINUE
        experiment.mark_pruned(Storage(self.exp), trial.config["trial_id"], step, result.get(METRIC), by=self.label)
        return decision


class PruningASHA(_Pruning, ASHAScheduler):
    pass


class PruningMedian(_Pruning, MedianStoppingRule):
    pass


def build_scheduler(spec: JobSpec, exp: str) -> Optional[TrialScheduler]:
    """The Tune scheduler of ``spec.search`` (None for ``none``), stamping its stops in ``exp``."""
    search = spec.search
    if search.scheduler == "none":
        return None
    grace = search.grace_period or spec.eval.every_steps
    common = dict(time_attr=TIME_ATTR, metric=METRIC, mode="min", grace_period=grace)
    if search.scheduler == "asha":
        # A trial reaching max_t ends on its own (stop_last_trials off): it is not stopped there.
        scheduler = PruningASHA(max_t=spec.train.max_steps or NO_LIMIT, reduction_factor=search.reduction_factor,
                                stop_last_trials=False, **common)
    else:
        # min_samples_required=2: the median of one other trial is just that trial.
        scheduler = PruningMedian(min_samples_required=2, **common)
    scheduler._init_pruning(exp, search.scheduler)
    return scheduler


