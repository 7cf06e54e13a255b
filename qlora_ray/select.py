"""Which finished trial is ``best``: the spec's ``results`` section applied to leaderboard rows.

The lowest value of the selection metric wins among finished trials that pass the forgetting
guard: a trial whose control-set perplexity rose by more than ``max_control_increase`` bought
its gain by forgetting and is passed over, with the reason shown in the leaderboard. Pure
Python, no torch or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from qlora_ray.records import is_number

METRICS = ("eval_ppl", "ppl_change", "control_ppl")


@dataclass(frozen=True)
class Selection:
    """How best is chosen (the spec's ``results`` section as stored in ``experiment.json``)."""

    metric: str = "eval_ppl"
    max_control_increase: Optional[float] = None

    @classmethod
    def from_plan(cls, raw: Optional[Dict[str, Any]]) -> "Selection":
        """From ``ExperimentPlan.select`` (None: the plain lowest eval perplexity)."""
        raw = raw or {}
        metric = raw.get("select") or "eval_ppl"
        return cls(metric=metric if metric in METRICS else "eval_ppl",
                   max_control_increase=raw.get("max_control_increase"))

    def describe(self) -> str:
        text = f"lowest {self.metric}"
        if self.max_control_increase is not None:
            text += f" among trials whose control perplexity rose by at most {self.max_control_increase:.0%}"
        return text


def passed_over(row: Any, selection: Selection) -> Optional[str]:
    """Why a finished ``row`` cannot be best under ``selection`` (None when it can)."""
    value = getattr(row, selection.metric, None)
    if not is_number(value):
        return f"no {selection.metric}"
    limit = selection.max_control_increase
    if limit is None:
        return None
    change = getattr(row, "control_change", None)
    if not is_number(change):
        return "no control figures to check forgetting against"
    if change > limit:
        return (f"control perplexity rose {change:+.1%} (limit +{limit:.0%}): "
                f"the eval gain was bought by forgetting")
    return None


def choose(rows: Sequence[Any], selection: Selection, finished: str = "finished") -> Tuple[Optional[Any], Dict[str, str]]:
    """(the best of the finished ``rows``, or None; trial id -> why it was passed over)."""
    eligible: List[Any] = []
    skipped: Dict[str, str] = {}
    for row in rows:
        if row.status != finished:
            continue
        why = passed_over(row, selection)
        if why is None:
            eligible.append(row)
        else:
            skipped[row.trial_id] = why
    best = min(eligible, key=lambda r: (getattr(r, selection.metric), r.trial_id)) if eligible else None
    return best, skipped
