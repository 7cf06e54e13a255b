"""A submit's time budget (``resources.time_budget``): sessions that end at a fixed time
(Kaggle's about 12 h, Colab's) stop every trial at a checkpoint before the session does.

The budget runs from the submit's start. A trial asks :class:`Deadline` after each step whether
the time left covers one more step and one checkpoint; when it does not, the trial saves a
checkpoint and stops (status ``stopped: time budget``), and the next submit resumes it. Every
trial that starts trains at least one step, so each submit makes progress. No Ray, no torch.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Optional

TIME_BUDGET = "time budget"  # a stopped trial's reason
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``11h30m``, ``90s``, ``1.5h``, ``45m`` or ``600`` (seconds);
    ValueError if malformed."""
    compact = str(text).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", compact):
        compact += "s"  # a bare number is seconds
    parts = _PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact or len({u for _, u in parts}) != len(parts):
        raise ValueError(f"'{text}' is not a duration; write it like 11h30m, 45m or 90s")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"'{text}' is not a positive duration")
    return seconds


@dataclass(frozen=True)
class Deadline:
    """When a submit's budget runs out (seconds since the epoch); travels to every trial."""

    at: float

    @classmethod
    def after(cls, budget: Optional[str], start: float) -> Optional["Deadline"]:
        """The deadline ``budget`` after ``start``, or None without a budget."""
        return cls(start + parse_duration(budget)) if budget else None

    def left(self) -> float:
        return self.at - time.time()

    def should_stop(self, margin_s: float) -> bool:
        """True when less than ``margin_s`` (one step plus one checkpoint, as the trial measured
        them) is left: the trial checkpoints and stops now rather than be cut off mid-step."""
        return self.left() < margin_s
