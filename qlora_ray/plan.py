"""The trial plan: a spec's sweep grid expanded into concrete, stably named trials."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Dict, List

from qlora_ray.spec import JobSpec, with_values


@dataclass(frozen=True)
class Trial:
    """One concrete run of the grid: its stable id, the swept values, and the resolved spec."""

    id: str
    values: Dict[str, Any]
    spec: JobSpec


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e") if value < 0.01 else f"{value:g}"
    return str(value).replace("/", "_").replace(" ", "_")


def _labels(keys: List[str]) -> Dict[str, str]:
    """Short labels by the last path part (``lora.r`` -> ``r``); full path where two would clash."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (short if last.count(short) == 1 else k.replace(".", "_")) for k, short in zip(keys, last)}


def expand(spec: JobSpec) -> List[Trial]:
    """The grid of ``spec.sweep`` (product of all lists, keys in spec order); one trial if none.

    Trial ids derive from the spec name and the swept values only, so re-running the same spec
    finds the same trials (and resumes them).
    """
    if not spec.sweep:
        return [Trial(id=spec.name, values={}, spec=with_values(spec, {}))]
    keys = list(spec.sweep)
    labels = _labels(keys)
    trials = []
    for combo in itertools.product(*(spec.sweep[k] for k in keys)):
        values = dict(zip(keys, combo))
        trial_spec = with_values(spec, values)
        # Ids use the typed values (so "1e-4" in YAML and 0.0001 name the same trial).
        typed = {k: _get(trial_spec, k) for k in keys}
        suffix = "_".join(f"{labels[k]}{_fmt(v)}" for k, v in typed.items())
        trials.append(Trial(id=f"{spec.name}-{suffix}", values=typed, spec=trial_spec))
    return trials


def _get(spec: Any, path: str) -> Any:
    for part in path.split("."):
        spec = getattr(spec, part)
    return spec
