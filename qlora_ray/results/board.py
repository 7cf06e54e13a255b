"""The leaderboard as data: one :class:`TrialRow` per trial, the :class:`Leaderboard` that ranks
them and picks the best, and the trial states a row's ``status`` holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from qlora_ray import records
from qlora_ray.records import TrialState, is_number
from qlora_ray.select import Selection, choose

# Trial states (``records.TrialState`` values), for readers comparing with a row's ``status``.
PENDING, RUNNING, FINISHED, FAILED, STOPPED = (s.value for s in TrialState if s != TrialState.PRUNED)
PRUNED = TrialState.PRUNED.value
# The leaderboard's order after the ranking.
STATE_ORDER = {FINISHED: 0, RUNNING: 1, PRUNED: 2, STOPPED: 3, PENDING: 4, FAILED: 5}


@dataclass
class TrialRow:
    """One trial's line in the leaderboard (all metrics optional: a running trial has few)."""

    trial_id: str
    values: Dict[str, Any]
    status: str
    reason: Optional[str] = None
    step: Optional[int] = None
    total_steps: Optional[int] = None
    base_ppl: Optional[float] = None
    eval_ppl: Optional[float] = None
    ppl_change: Optional[float] = None
    train_loss: Optional[float] = None
    tokens_per_s: Optional[float] = None
    peak_mem_gb: Optional[float] = None
    train_wall_s: Optional[float] = None
    trial_wall_s: Optional[float] = None
    attempts: Optional[int] = None
    # trial_wall_s - train_wall_s split: worker_start_s, worker_setup_s, teardown_s (last run only).
    overhead_parts: Optional[Dict[str, float]] = None
    dir: Optional[str] = None
    losses: List[tuple] = field(default_factory=list, repr=False)
    # (step, periodic eval perplexity) of every eval step so far (eval.every_steps).
    evals: List[tuple] = field(default_factory=list, repr=False)
    pruned_step: Optional[int] = None  # where the sweep's scheduler stopped it
    best_step: Optional[int] = None    # eval.keep best: the step whose adapter the trial kept

    @property
    def state_text(self) -> str:
        """The status cell: ``pruned @ step k`` for a trial the scheduler stopped."""
        if self.status == PRUNED and self.pruned_step is not None:
            return f"pruned @ step {self.pruned_step}"
        if self.status == FINISHED and self.best_step is not None:
            return f"finished, best @ step {self.best_step}"
        return self.status
    control_base_ppl: Optional[float] = None
    control_ppl: Optional[float] = None
    control_change: Optional[float] = None
    base_ppl_unquantized: Optional[float] = None
    change_vs_unquantized: Optional[float] = None
    passed_over: Optional[str] = None  # why the selection did not pick this finished trial

    @property
    def overhead_s(self) -> Optional[float]:
        """Time the trial spent outside the training function (Ray start-up, restarts, sync)."""
        if self.trial_wall_s is None or self.train_wall_s is None:
            return None
        return self.trial_wall_s - self.train_wall_s


@dataclass
class Leaderboard:
    name: str
    sweep_keys: List[str]
    rows: List[TrialRow]
    base_ppl: Optional[float] = None
    spec_file: Optional[str] = None  # the spec last submitted (how to resume stopped trials)
    selection: Selection = field(default_factory=Selection)
    test: Optional[records.TestFigures] = None  # the best trial on the held-out test set

    @property
    def best(self) -> Optional[TrialRow]:
        """The finished trial the selection picks (``results`` in the spec; by default the lowest
        eval perplexity); trials it passes over carry the reason in ``passed_over``."""
        best, skipped = choose(self.rows, self.selection, FINISHED)
        for row in self.rows:
            row.passed_over = skipped.get(row.trial_id)
        return best

    @property
    def base_ppl_unquantized(self) -> Optional[float]:
        return next((r.base_ppl_unquantized for r in self.rows if is_number(r.base_ppl_unquantized)), None)

    @property
    def failed(self) -> List[TrialRow]:
        return [r for r in self.rows if r.status == FAILED]

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for row in self.rows:
            out[row.status] = out.get(row.status, 0) + 1
        return out


