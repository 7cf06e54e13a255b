"""Random search's draws (``search.method: random``): configurations drawn from the sweep's
distributions with a seeded generator, so the same spec always draws the same trials.

Pure Python (no torch, no Ray). Draws are sequential from one generator seeded by
``search.seed``: a larger ``num_samples`` keeps the first draws and adds to them. Drawn floats
are rounded to 3 significant digits (ids read ``lr2.37e-4``, and a value is written the same in
the id, the spec and the leaderboard); a key whose schema type is int gets whole numbers.
A configuration drawn twice is drawn again.
"""

from __future__ import annotations

import math
import random
from typing import Any, Dict, List

DIGITS = 3
TRIES_PER_SAMPLE = 50  # redraws allowed for duplicates before the space counts as too small


class SpaceTooSmall(ValueError):
    """Fewer distinct configurations than ``num_samples`` could be drawn."""


def _round(value: float, integer: bool) -> Any:
    if integer:
        return int(round(value))
    return float(f"{value:.{DIGITS - 1}e}")


def _draw(rng: random.Random, space: Any, integer: bool) -> Any:
    if isinstance(space, list):  # a list is a choice
        return space[rng.randrange(len(space))]
    (kind, values), = space.items()
    if kind == "choice":
        return values[rng.randrange(len(values))]
    low, high = values
    if kind == "loguniform":
        return _round(math.exp(rng.uniform(math.log(low), math.log(high))), integer)
    return _round(rng.uniform(low, high), integer)


def draw(sweep: Dict[str, Any], int_keys: set, num_samples: int, seed: int) -> List[Dict[str, Any]]:
    """``num_samples`` distinct configurations (key -> value, keys in sweep order) drawn from ``sweep``."""
    rng = random.Random(seed)
    out: List[Dict[str, Any]] = []
    seen = set()
    for _ in range(num_samples * TRIES_PER_SAMPLE):
        if len(out) == num_samples:
            break
        config = {key: _draw(rng, space, key in int_keys) for key, space in sweep.items()}
        if repr(config) not in seen:
            seen.add(repr(config))
            out.append(config)
    if len(out) < num_samples:
        raise SpaceTooSmall(f"only {len(out)} distinct configurations drawn for search.num_samples {num_samples}; "
                            "lower num_samples or widen the sweep")
    return out
