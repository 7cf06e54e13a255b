"""Walking the schema: its dotted leaf paths, unknown keys in a raw tree, flattening, the
reference table of the README."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Dict, Iterator

from omegaconf import MISSING

from qlora_ray.spec.fields import Problem, show
from qlora_ray.spec.job import SECTION_NAMES, SUBSECTIONS, JobSpec


def _schema_fields(cls: type) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def leaf_paths(cls: type = JobSpec, prefix: str = "") -> Dict[str, dataclasses.Field]:
    """All dotted leaf paths of the schema (sections expanded), e.g. ``lora.r``."""
    out = {}
    for name, f in _schema_fields(cls).items():
        path = f"{prefix}{name}"
        if cls is JobSpec and name in SECTION_NAMES.values():
            out.update(leaf_paths(_section_class(name), path + "."))
        elif path in SUBSECTIONS:
            out.update(leaf_paths(SUBSECTIONS[path], path + "."))
        else:
            out[path] = f
    return out


def _section_class(name: str) -> type:
    return {v: k for k, v in SECTION_NAMES.items()}[name]


def unknown_keys(raw: Dict[str, Any], cls: type, prefix: str) -> Iterator[Problem]:
    """Keys of ``raw`` that the schema class ``cls`` does not have (with the closest one it does)."""
    known = _schema_fields(cls)
    for key, value in raw.items():
        path = f"{prefix}{show(key, 60)}"
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            yield path, f"unknown key{hint}"
        elif cls is JobSpec and key in SECTION_NAMES.values():
            if not isinstance(value, dict):
                yield path, f"must be a mapping of {key} settings, got {type(value).__name__}"
            else:
                yield from unknown_keys(value, _section_class(key), path + ".")
        elif f"{prefix}{key}" in SUBSECTIONS:
            if not isinstance(value, dict):
                yield path, f"must be a mapping of {key} settings, got {type(value).__name__}"
            else:
                yield from unknown_keys(value, SUBSECTIONS[f"{prefix}{key}"], path + ".")


def flatten(raw: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A raw tree as ``{dotted path: value}``, sections and their nested mappings expanded."""
    out = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and (path in SECTION_NAMES.values() or path in SUBSECTIONS):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def has_interpolation(value: Any) -> bool:
    """Whether ``value`` (or anything inside it) holds an OmegaConf ``${...}`` interpolation."""
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, list):
        return any(has_interpolation(v) for v in value)
    if isinstance(value, dict):
        return any(has_interpolation(v) for v in value.values())
    return False


def get_path(spec: Any, path: str) -> Any:
    """The value at a dotted path of a typed spec, e.g. ``data.train``."""
    for part in path.split("."):
        spec = getattr(spec, part)
    return spec


def reference_markdown() -> str:
    """The spec reference table, generated from the schema (kept in README.md)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for path, f in leaf_paths().items():
        if f.default is not dataclasses.MISSING:
            default = "required" if f.default == MISSING else repr(f.default) if f.default is not None else "null"
        else:
            default = repr(f.default_factory())
        lines.append(f"| `{path}` | {default} | {f.metadata.get('help', '')} |")
    return "\n".join(lines)
