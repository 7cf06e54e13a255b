"""The sweep: its shape and size checked before any value is read, then every swept value
checked (and typed) as its trial would be."""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from omegaconf.errors import OmegaConfBaseException

from qlora_ray.spec.fields import DISTRIBUTIONS, Problem, omegaconf_message, show
from qlora_ray.spec.job import SECTION_NAMES, JobSpec, with_values
from qlora_ray.spec.paths import PATH_KEYS, file_problems
from qlora_ray.spec.schema import get_path, leaf_paths

SWEEPABLE_SECTIONS = tuple(n for n in SECTION_NAMES.values() if n not in ("output", "search"))
VALUE_PROBLEMS_SHOWN = 5  # per sweep key; the rest are counted


def check_sweep_shape(raw: Dict[str, Any], problems: List[Problem]) -> Dict[str, Any]:
    """``raw`` with a malformed sweep (or one over ``max_trials``) left out, its problems added."""
    sweep = raw.get("sweep")
    if sweep is not None and not isinstance(sweep, dict):
        problems.append(("sweep", "must be a mapping of spec path -> list of values"))
        return {k: v for k, v in raw.items() if k != "sweep"}
    if not sweep:
        return raw
    for key, values in sweep.items():
        if not isinstance(values, list) and not _is_distribution(values):
            problems.append((f"sweep.{show(key, 60)}", f"must be a list of values, e.g. [{show(values)}], or "
                                                       f"(search.method: random) one of {{{', '.join(f'{d}: [...]' for d in DISTRIBUTIONS)}}}"))
    lists = {k: v for k, v in sweep.items() if isinstance(v, list) or _is_distribution(v)}
    # Counted before any value is looked at, so a huge grid fails at once.
    trials = _planned_count(lists, raw.get("search") if isinstance(raw.get("search"), dict) else {})
    resources = raw.get("resources") if isinstance(raw.get("resources"), dict) else {}
    limit = resources.get("max_trials")
    limit = limit if isinstance(limit, int) and not isinstance(limit, bool) else _default("resources.max_trials")
    if trials > limit:
        shape = " x ".join(f"{show(k, 40)} {len(v):,}" for k, v in list(lists.items())[:6] if isinstance(v, list))
        problems.append(("sweep", f"plans {trials:,} trials ({shape}), over resources.max_trials ({limit:,}); sweep "
                                  "fewer values, or raise resources.max_trials in the spec if you mean it"))
        return {k: v for k, v in raw.items() if k != "sweep"}
    return {**raw, "sweep": lists}


def _is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def _default(key: str) -> Any:
    return leaf_paths()[key].default


def _planned_count(sweep: Dict[str, Any], search: Dict[str, Any]) -> int:
    """How many trials a raw sweep plans: the grid's product or random's num_samples, times seeds."""
    def number(key: str) -> int:
        value = search.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
            else _default(f"search.{key}")
    if search.get("method") == "random":
        configs = number("num_samples")
    else:
        configs = math.prod(len(v) for v in sweep.values() if isinstance(v, list))
    return configs * number("seeds")


def sweep_problems(spec: JobSpec, path: Path, declared: Optional[str],
                   typed_sweep: Dict[str, List[Any]]) -> Iterator[Problem]:
    """Each swept value checked as its trial would be; fills ``typed_sweep`` with the typed values."""
    leaves = leaf_paths()
    for key, values in spec.sweep.items():
        where = f"sweep.{show(key, 60)}"
        if key not in leaves or key.split(".")[0] not in SWEEPABLE_SECTIONS:
            close = difflib.get_close_matches(str(key), list(leaves), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            yield where, f"'{show(key, 60)}' is not a spec path that can be swept{hint}"
            continue
        if isinstance(values, dict):
            yield from _distribution_problems(spec, key, values, path, declared, typed_sweep)
            continue
        if not values:
            yield where, "must list at least one value"
            continue
        typed, bad = [], 0
        for i, value in enumerate(values):
            problem, typed_value = _swept_value_problem(spec, key, value, path, declared)
            typed.append(typed_value)
            if problem is not None:
                bad += 1
                if bad <= VALUE_PROBLEMS_SHOWN:
                    yield f"{where}[{i}]", problem
        if bad > VALUE_PROBLEMS_SHOWN:
            yield where, f"{bad - VALUE_PROBLEMS_SHOWN:,} more values have problems"
        if bad:
            continue
        # Compared typed: 1.0e-4 and '1e-4' are the same trial twice.
        seen: Dict[str, int] = {}
        for i, value in enumerate(typed):
            if repr(value) in seen:
                yield f"{where}[{i}]", f"lists {show(value)} twice (also at [{seen[repr(value)]}])"
                break
            seen[repr(value)] = i
        typed_sweep[key] = typed


def _distribution_problems(spec: JobSpec, key: str, dist: Dict[str, Any], path: Path, declared: Optional[str],
                           typed_sweep: Dict[str, Any]) -> Iterator[Problem]:
    """A random-search distribution: its kind allowed here, its bounds or choices valid values of ``key``."""
    (kind, values), = dist.items()
    where = f"sweep.{show(key, 60)}.{kind}"
    if spec.search.method != "random":
        yield where, f"a distribution needs search.method: random (a grid sweeps lists); set it or list the values"
        return
    bounded = kind != "choice"
    if not isinstance(values, list) or not values or (bounded and len(values) != 2):
        yield where, "must be [low, high]" if bounded else "must be a non-empty list of values"
        return
    typed = []
    for i, value in enumerate(values):
        problem, typed_value = _swept_value_problem(spec, key, value, path, declared)
        if problem is None and bounded and (isinstance(typed_value, bool) or not isinstance(typed_value, (int, float))):
            problem = f"{kind} needs numbers, got {show(value)}"
        if problem is not None:
            yield f"{where}[{i}]", problem
            return
        typed.append(typed_value)
    if bounded and not typed[0] < typed[1]:
        yield where, f"low must be below high, got [{show(typed[0])}, {show(typed[1])}]"
    elif kind == "loguniform" and typed[0] <= 0:
        yield where, f"loguniform needs low > 0, got {show(typed[0])}"
    elif not bounded and len({repr(v) for v in typed}) < len(typed):
        yield where, "lists a value twice"
    else:
        typed_sweep[key] = {kind: typed}


def _swept_value_problem(spec: JobSpec, key: str, value: Any, path: Path,
                         declared: Optional[str]) -> tuple[Optional[str], Any]:
    """(what is wrong with ``value`` at ``key``, or None; the value as typed)."""
    try:
        trial = with_values(spec, {key: value})
    except OmegaConfBaseException as e:
        return omegaconf_message(e, value), None
    found = list(trial.problems())
    if key in PATH_KEYS:
        found += list(file_problems(trial, path, declared))
    return next((message for where, message in found if where == key), None), get_path(trial, key)
