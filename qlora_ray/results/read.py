"""Reading an experiment folder into a :class:`Leaderboard`: every trial of the plan (pending
ones too) and any other trial folder, from whatever each has written so far."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, Optional

from qlora_ray import layout, records
from qlora_ray.records import TrialState
from qlora_ray.results.board import STATE_ORDER, Leaderboard, TrialRow, is_number
from qlora_ray.select import Selection


def _with_tracking(reason: Optional[str], folder: Path) -> Optional[str]:
    """A trial's reason, plus what its experiment trackers could not log."""
    note = records.TrackingNote.read(folder / layout.TRACKING_FILE)
    if note is None or not note.errors:
        return reason
    return "; ".join(filter(None, [reason, "tracking failed: " + "; ".join(note.errors)]))


def read_trial(folder: Path, values: Optional[Dict[str, Any]] = None) -> TrialRow:
    """A leaderboard row from one trial folder (whatever it holds so far)."""
    status = records.TrialStatus.read(folder / layout.STATUS_FILE)
    result = records.TrialResult.read(folder / layout.RESULT_FILE)
    final = result.final if result else None
    steps = records.read_metrics(folder / layout.METRICS_FILE)
    last = steps[-1] if steps else None
    if status is not None:
        state = status.status
        if state == TrialState.RUNNING and final is not None:
            state = TrialState.FINISHED  # the final figures landed; the runtime has not stamped it yet
    else:
        state = TrialState.FINISHED if final else TrialState.RUNNING if steps else TrialState.PENDING
    latest = final or last
    evals = [(m.step, m.eval_ppl) for m in steps if is_number(m.eval_ppl)]
    pruned = status is not None and state == TrialState.PRUNED
    row = TrialRow(
        trial_id=(status.trial_id if status else None) or folder.name,
        values=(status.values if status else None) or values or {},
        status=state.value,
        reason=_with_tracking(status.reason if status else None, folder),
        step=latest.step if latest else None,
        total_steps=(latest.total_steps if latest else None) or (status.total_steps if status else None),
        base_ppl=final.base_ppl if final else None,
        eval_ppl=final.eval_ppl if final else None,
        ppl_change=final.ppl_change if final else None,
        train_loss=final.train_loss if final else (last.loss if last else None),
        tokens_per_s=_latest(final, last, "tokens_per_s"),
        peak_mem_gb=_latest(final, last, "peak_mem_gb"),
        train_wall_s=final.wall_s if final else None,
        trial_wall_s=status.trial_wall_s if status else None,
        overhead_parts=status.overhead.fields() if status and status.overhead else None,
        attempts=status.attempts if status else None,
        dir=str(folder),
        losses=[(m.step, m.loss) for m in steps if is_number(m.loss)],
        evals=evals,
        best_step=final.best_step if final else None,
        **_side_figures(final),
    )
    if pruned:
        # Its figure is the last periodic eval (on the periodic subset, if one is set).
        row.pruned_step = status.pruned_step
        row.step = status.pruned_step if status.pruned_step is not None else row.step
        row.eval_ppl = status.pruned_eval_ppl if is_number(status.pruned_eval_ppl) else (evals[-1][1] if evals else None)
        row.reason = None
    return row


def _side_figures(final: Optional[records.FinalMetrics]) -> Dict[str, Any]:
    keys = ("control_base_ppl", "control_ppl", "control_change", "base_ppl_unquantized", "change_vs_unquantized")
    return {k: getattr(final, k, None) for k in keys} if final else {}


def _latest(final: Optional[records.FinalMetrics], last: Optional[records.StepMetrics], key: str) -> Any:
    for record in (final, last):
        value = getattr(record, key, None) if record is not None else None
        if value is not None:
            return value
    return None


def _is_trial_dir(path: Path) -> bool:
    return (path.is_dir() and not path.is_symlink() and path.name not in layout.NOT_TRIALS
            and not path.name.startswith(".")
            and any((path / f).exists() for f in layout.TRIAL_MARKERS))


def read_leaderboard(exp_dir: str | os.PathLike) -> Leaderboard:
    """Every trial of the plan (pending ones too) plus any other trial folder found, ranked."""
    exp = Path(exp_dir)
    if not exp.is_dir():
        raise FileNotFoundError(f"no experiment folder at {exp}")
    plan = records.ExperimentPlan.read(exp / layout.EXPERIMENT_FILE) or records.ExperimentPlan(name=exp.name)
    planned = {t.id: t.values for t in plan.trials}
    rows = {tid: read_trial(exp / tid, values) for tid, values in planned.items()}
    for folder in sorted(exp.iterdir()):
        if folder.name not in rows and _is_trial_dir(folder):
            rows[folder.name] = read_trial(folder)
    keys = list(plan.sweep_keys)
    for row in rows.values():
        keys += [k for k in row.values if k not in keys]
    baseline = records.Baseline.read(exp / layout.BASELINE_FILE)
    base = baseline.perplexity if baseline else None
    if not is_number(base):
        base = next((r.base_ppl for r in rows.values() if is_number(r.base_ppl)), None)
    for row in rows.values():
        if row.base_ppl is None and is_number(base):
            row.base_ppl = base
    ranked = sorted(rows.values(), key=_rank_key)
    board = Leaderboard(name=plan.name or exp.name, sweep_keys=keys, rows=ranked,
                        base_ppl=base if is_number(base) else None, selection=Selection.from_plan(plan.select),
                        spec_file=plan.spec_file or None,
                        test=records.TestFigures.read(exp / layout.TEST_FILE))
    board.best  # fills each row's passed_over
    # A trial the selection passed over ranks after the finished trials it may pick from.
    board.rows.sort(key=lambda r: (STATE_ORDER.get(r.status, 5), r.passed_over is not None))
    return board


def _rank_key(row: TrialRow) -> tuple:
    ppl = row.eval_ppl if is_number(row.eval_ppl) else math.inf
    return (STATE_ORDER.get(row.status, 5), ppl, -(row.step or 0), row.trial_id)
