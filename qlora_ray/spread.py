"""Seed spread (``search.seeds``): a sweep's trials grouped by configuration (their swept values
without ``train.seed``), with the mean and spread of eval perplexity over the seeds, and a flag on
every configuration whose mean differs from the best one's by no more than the spread: a
difference the seeds alone make, not one to pick a configuration by.

Pure Python (no torch, no Ray), like ``results``, which calls it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

SEED_KEY = "train.seed"


@dataclass
class ConfigSpread:
    """One configuration over its seeds (finished trials only)."""

    values: Dict[str, Any]
    trial_ids: List[str] = field(default_factory=list)
    ppls: List[float] = field(default_factory=list)
    within_spread_of_best: bool = False

    @property
    def n(self) -> int:
        return len(self.ppls)

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.ppls) if self.ppls else None

    @property
    def spread(self) -> Optional[float]:
        """Sample standard deviation over the seeds (None below two finished seeds)."""
        return statistics.stdev(self.ppls) if len(self.ppls) >= 2 else None

    def fields(self) -> Dict[str, Any]:
        return {"values": self.values, "trials": self.trial_ids, "n": self.n, "mean_eval_ppl": self.mean,
                "spread": self.spread, "min": min(self.ppls, default=None), "max": max(self.ppls, default=None),
                "within_spread_of_best": self.within_spread_of_best}


def configurations(rows, finished: str = "finished") -> List[ConfigSpread]:
    """Rows (``results.TrialRow``) grouped by configuration, best mean first; empty unless some trial
    carries ``train.seed`` among its values (the plan repeated configurations over seeds)."""
    if not any(SEED_KEY in row.values for row in rows):
        return []
    groups: Dict[str, ConfigSpread] = {}
    for row in rows:
        config = {k: v for k, v in row.values.items() if k != SEED_KEY}
        group = groups.setdefault(repr(sorted(config.items(), key=lambda kv: kv[0])), ConfigSpread(values=config))
        group.trial_ids.append(row.trial_id)
        if row.status == finished and isinstance(row.eval_ppl, (int, float)) and math.isfinite(row.eval_ppl):
            group.ppls.append(float(row.eval_ppl))
    ranked = sorted(groups.values(), key=lambda g: (g.mean is None, g.mean or 0.0))
    _flag(ranked)
    return ranked


def _flag(ranked: List[ConfigSpread]) -> None:
    """Flag configurations whose mean is within the larger of the two spreads of the best mean."""
    best = ranked[0] if ranked and ranked[0].mean is not None else None
    if best is None:
        return
    for group in ranked[1:]:
        spreads = [s for s in (best.spread, group.spread) if s is not None]
        if group.mean is not None and spreads:
            group.within_spread_of_best = abs(group.mean - best.mean) <= max(spreads)


def to_markdown(groups: List[ConfigSpread], short) -> List[str]:
    """The leaderboard's section on seed spread (lines), ``short`` naming a key for a header."""
    if not groups:
        return []
    lines = ["", "## Configurations over seeds", "",
             "Mean and spread (sample standard deviation) of eval perplexity over each configuration's "
             "finished seeds. *within spread*: its mean differs from the best one's by no more than "
             "the spread, so the seeds alone may explain the difference.", "",
             "| configuration | seeds | mean ppl | spread | min | max | vs best |", "|---|---|---|---|---|---|---|"]
    for i, g in enumerate(groups):
        name = " ".join(f"{short(k)}={v:g}" if isinstance(v, float) else f"{short(k)}={v}" for k, v in g.values.items())
        cells = [f"{x:.2f}" if x is not None else "" for x in (g.mean, g.spread, min(g.ppls, default=None),
                                                               max(g.ppls, default=None))]
        note = "best" if i == 0 and g.mean is not None else "within spread" if g.within_spread_of_best else ""
        lines.append(f"| {name or '(base spec)'} | {g.n}/{len(g.trial_ids)} | {' | '.join(cells)} | {note} |")
    return lines
