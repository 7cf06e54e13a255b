"""The trial plan: a spec's sweep grid expanded into concrete, stably named trials.

A trial id is ``<name>-<label><value>_<label><value>...``, e.g. ``hinglish_sweep-r16_lr2e-4``.
Each value is written exactly (the shortest text that reads back as the same number), so two
different values never print alike; a value too long for a folder name, or one that
prints like another value of its key once made safe for a folder name, gets a short hash of
the value after it. A plan whose ids still collide, or run past :data:`MAX_NAME_BYTES`, is a
spec error (:func:`plan_problems`).

``search.method: random`` draws ``num_samples`` configurations (``sampling``) instead of the
product; each key's id text is chosen over all its drawn values the same way. ``search.seeds: N``
repeats every configuration with ``train.seed`` = seed, seed+1, ... (``..._seed43``).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List

from qlora_ray import sampling
from qlora_ray.spec import MAX_NAME_BYTES, JobSpec, leaf_paths, show, with_values

SEED_KEY = "train.seed"

LABEL_CHARS = 40  # longest value text kept in an id before it is cut and hashed
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\\s]")


@dataclass(frozen=True)
class Trial:
    """One concrete run of the grid: its stable id, the swept values, and the resolved spec."""

    id: str
    values: Dict[str, Any]
    spec: JobSpec


def _float_text(value: float) -> str:
    if value < 0.01:
        # The fewest mantissa digits that read back as this float: 2e-4 stays "2e-4" (as
        # before), 1.4e-4 is "1.4e-4", never a rounded "1e-4".
        for digits in range(17):
            text = f"{value:.{digits}e}"
            if float(text) == value:
                break
        mantissa, exponent = text.split("e")
        return f"{mantissa}e{int(exponent)}"
    text = f"{value:g}"
    return text if float(text) == value else repr(value).replace("e+", "e")


def _fmt(value: Any) -> str:
    """``value`` as id text: exact for numbers; strings made safe for a folder name."""
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, (bool, int)):
        return str(value)
    text = str(value)
    if os.path.isabs(text):  # a swept local path: its file name reads best
        text = os.path.basename(text.rstrip("/")) or text
    return _UNSAFE.sub("_", text)


def _hash(value: Any) -> str:
    return hashlib.sha256(repr(value).encode("utf-8")).hexdigest()[:6]


def _value_texts(values: List[Any]) -> List[str]:
    """Id text for each value of one sweep key; unique among them wherever the values differ."""
    texts = [_fmt(value) for value in values]
    reprs: Dict[str, set] = {}
    for text, value in zip(texts, values):
        reprs.setdefault(text, set()).add(repr(value))
    out = []
    for text, value in zip(texts, values):
        if len(text) > LABEL_CHARS or len(reprs[text]) > 1:
            text = f"{text[:LABEL_CHARS]}-{_hash(value)}"
        out.append(text)
    return out


def _labels(keys: List[str]) -> Dict[str, str]:
    """Short labels by the last path part (``lora.r`` -> ``r``); full path where two would clash."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (short if last.count(short) == 1 else k.replace(".", "_")) for k, short in zip(keys, last)}


def _typed_grid(spec: JobSpec) -> Dict[str, List[Any]]:
    """Each sweep key's values as the schema types them ("1e-4" in YAML is 0.0001), once per value."""
    return {k: [_get(with_values(spec, {k: v}), k) for v in values] for k, values in spec.sweep.items()}


def _grid_ids(name: str, grid: Dict[str, List[Any]]) -> List[str]:
    keys = list(grid)
    labels = _labels(keys)
    texts = [[f"{labels[k]}{t}" for t in _value_texts(grid[k])] for k in keys]
    return [f"{name}-{'_'.join(parts)}" for parts in itertools.product(*texts)]


def _configs(spec: JobSpec) -> List[Dict[str, Any]]:
    """The plan's swept values, one dict per trial, in :func:`expand` order (seeds repeated)."""
    if spec.search.method == "random":
        leaves = leaf_paths()
        ints = {k for k in spec.sweep if leaves[k].type in (int, "int")}
        configs = sampling.draw(spec.sweep, ints, spec.search.num_samples, spec.search.seed)
    else:
        grid = _typed_grid(spec)
        configs = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else [{}]
    if spec.search.seeds > 1:
        first = spec.train.seed
        configs = [{**c, SEED_KEY: first + k} for c in configs for k in range(spec.search.seeds)]
    return configs


def _ids(name: str, configs: List[Dict[str, Any]]) -> List[str]:
    """Ids for arbitrary configurations: each key's value texts chosen over all its values."""
    keys = list(configs[0])
    labels = _labels(keys)
    texts = {}
    for k in keys:
        values = [c[k] for c in configs]
        distinct = list({repr(v): v for v in values}.values())
        texts[k] = dict(zip((repr(v) for v in distinct), _value_texts(distinct)))
    return [f"{name}-{'_'.join(labels[k] + texts[k][repr(c[k])] for k in keys)}" for c in configs]


def _plain_grid(spec: JobSpec) -> bool:
    return spec.search.method == "grid" and spec.search.seeds == 1


def trial_ids(spec: JobSpec) -> List[str]:
    """The ids of the plan's trials, in :func:`expand` order, without building the trials."""
    if not spec.sweep and spec.search.seeds == 1:
        return [spec.name]
    if _plain_grid(spec):
        return _grid_ids(spec.name, _typed_grid(spec))
    return _ids(spec.name, _configs(spec))


def plan_problems(spec: JobSpec) -> Iterator[tuple]:
    """(key path, message) for ids that collide or are too long to name a folder, or a random
    search space too small for its num_samples."""
    try:
        ids = trial_ids(spec)
    except sampling.SpaceTooSmall as e:
        yield "search.num_samples", str(e)
        return
    first: Dict[str, int] = {}
    for i, trial_id in enumerate(ids):
        if trial_id in first:
            yield "sweep", (f"trials {first[trial_id]} and {i} would both be '{show(trial_id)}'; "
                            "make the swept values differ")
            break
        first[trial_id] = i
    longest = max(ids, key=lambda t: len(t.encode("utf-8")))
    size = len(longest.encode("utf-8"))
    if size > MAX_NAME_BYTES and ids != [spec.name]:
        yield "name", (f"with the sweep suffix, trial id '{show(longest)}' is {size} bytes; at most "
                       f"{MAX_NAME_BYTES} (it names a folder): shorten name or the swept values")


def expand(spec: JobSpec) -> List[Trial]:
    """The grid of ``spec.sweep`` (product of all lists, keys in spec order), or random's draws,
    each repeated over ``search.seeds``; one trial if none.

    Trial ids derive from the spec name and the swept values only, so re-running the same spec
    finds the same trials (and resumes them).
    """
    if not spec.sweep and spec.search.seeds == 1:
        return [Trial(id=spec.name, values={}, spec=with_values(spec, {}))]
    if not _plain_grid(spec):
        configs = _configs(spec)
        return [Trial(id=i, values=c, spec=with_values(spec, c)) for i, c in zip(_ids(spec.name, configs), configs)]
    grid = _typed_grid(spec)
    keys = list(grid)
    ids = _grid_ids(spec.name, grid)
    trials = []
    for trial_id, combo in zip(ids, itertools.product(*grid.values())):
        values = dict(zip(keys, combo))
        trials.append(Trial(id=trial_id, values=values, spec=with_values(spec, values)))
    return trials


def _get(spec: Any, path: str) -> Any:
    for part in path.split("."):
        spec = getattr(spec, part)
    return spec
