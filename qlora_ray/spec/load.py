"""Loading a spec: read strictly, inherit (``base:``), override from the command line, then
check against the schema with every problem collected into one :class:`SpecError`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qlora_ray import strict_yaml
from qlora_ray.spec.fields import Problem, SpecError, omegaconf_message, show
from qlora_ray.spec.job import JobSpec
from qlora_ray.spec.paths import anchor_paths, file_problems
from qlora_ray.spec.schema import flatten, has_interpolation, unknown_keys
from qlora_ray.spec.sweep import check_sweep_shape, sweep_problems


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = _parse_yaml(strict_yaml.decode(path.read_bytes()))
    except OSError as e:
        raise SpecError([f"{path}: cannot read spec file: {e.strerror}"]) from None
    except strict_yaml.YamlProblem as e:
        raise SpecError([f"{path}: {where + ': ' if where else ''}{message}" for where, message in e.problems]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SpecError([f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError([f"{path}: a spec must be a YAML mapping of sections, got {type(data).__name__}"])
    return data


def _parse_yaml(text: str) -> Any:
    return strict_yaml.load(text)


def _deep_merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "sweep":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_chain(path: Path, seen: tuple = ()) -> tuple[Dict[str, Any], Dict[str, Path]]:
    """Read a spec and its ``base:`` ancestors; returns the merged tree and each leaf's source file."""
    path = path.resolve()
    if path in seen:
        raise SpecError([f"{path}: base: inheritance loops back to this file"])
    raw = _read_yaml(path)
    # Relative paths are anchored to the file that wrote them, before files are merged.
    raw = anchor_paths(raw, path.parent)
    origin = {k: path for k in flatten(raw)}
    base = raw.get("base")
    if base is None:
        return raw, origin
    if not isinstance(base, str):
        raise SpecError([f"{path}: base: must be a path to another spec file"])
    base_path = Path(base) if Path(base).is_absolute() else path.parent / base
    if not base_path.is_file():
        raise SpecError([f"{path}: base: file '{base}' not found (looked at {base_path})"])
    parent, parent_origin = _load_chain(base_path, seen + (path,))
    merged = _deep_merge(parent, {k: v for k, v in raw.items() if k != "base"})
    merged["base"] = str(base_path.resolve())
    return merged, {**parent_origin, **origin}


def parse_overrides(overrides: List[str]) -> Dict[str, Any]:
    """``['train.lr=1e-4', 'lora.r=8']`` -> ``{'train.lr': '1e-4', 'lora.r': 8}`` (values parsed as YAML)."""
    out, bad = {}, []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            bad.append(f"override '{item}': expected key.path=value, e.g. train.lr=1e-4")
            continue
        try:
            out[key.strip()] = _parse_yaml(value) if value.strip() else None
        except strict_yaml.AliasError as e:
            bad.append(f"command line: {show(key.strip(), 60)}: {e.problem}")
        except (yaml.YAMLError, strict_yaml.YamlProblem):
            out[key.strip()] = value
    if bad:
        raise SpecError(bad)
    return out


def _set_path(tree: Dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def load_spec(path: str | os.PathLike, overrides: Optional[List[str]] = None) -> JobSpec:
    """Load, inherit, override and validate a job spec; raise :class:`SpecError` with every problem."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"{path}: spec file not found"])
    raw, origin = _load_chain(path)
    cwd = Path.cwd()
    given = parse_overrides(overrides or [])
    if "base" in given:
        raise SpecError([f"command line: base: cannot be given as an override (base is read before the "
                         f"spec, overrides after it); write 'base: {show(given['base'])}' into a spec file, "
                         "or make a small spec with that base: line and your changes"])
    for key, value in given.items():
        if key in ("data.train", "data.eval", "eval.prompts", "output.dir") and isinstance(value, str):
            value = anchor_paths({key.split(".")[0]: {key.split(".")[1]: value}}, cwd)[key.split(".")[0]][key.split(".")[1]]
        _set_path(raw, key, value)
        origin[key] = Path("command line")
    return build_spec(raw, origin, path, declared_output=_declared_output(path, overrides or []))


def build_spec(raw: Dict[str, Any], origin: Dict[str, Path], path: Path,
               declared_output: Optional[str] = None) -> JobSpec:
    """Check a merged raw tree against the schema; return a typed JobSpec or raise SpecError."""
    problems: List[Problem] = list(unknown_keys(raw, JobSpec, ""))
    if isinstance(raw.get("lora"), dict) and isinstance(raw["lora"].get("target_modules"), str):
        raw["lora"]["target_modules"] = [raw["lora"]["target_modules"]]
    raw = check_sweep_shape(raw, problems)
    cfg = OmegaConf.structured(JobSpec)
    bad_paths = {p for p, _ in problems}
    for key, value in flatten(raw).items():
        if key in bad_paths or key.split(".")[0] in bad_paths:
            continue
        if has_interpolation(value):
            problems.append((key, "interpolation (${...}) is not allowed in specs; write the value itself"))
            continue
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as e:
            problems.append((key, omegaconf_message(e, value)))
    for key in sorted(OmegaConf.missing_keys(cfg)):
        if key not in {k for k, _ in problems}:
            problems.append((key, "is required but missing"))
        # A stand-in lets the range checks below still run, so every problem shows at once.
        OmegaConf.update(cfg, key, "_missing_", merge=False)
    spec = OmegaConf.to_object(cfg)
    reported = {key for key, _ in problems}
    typed_sweep: Dict[str, List[Any]] = {}
    later = [*spec.problems(), *file_problems(spec, path, declared_output),
             *sweep_problems(spec, path, declared_output, typed_sweep)]
    problems.extend((key, msg) for key, msg in later
                    if key not in reported and not any(key.startswith(r + ".") for r in reported))
    if not problems:
        spec.sweep = typed_sweep
        # The trial ids are part of what makes a spec runnable: unique, and short enough to
        # name folders. Imported here because the plan is built on this package.
        from qlora_ray.plan import plan_problems
        problems.extend(plan_problems(spec))
    if problems:
        raise SpecError([f"{_source(origin, key, path)}: {key}: {message}" for key, message in problems])
    return spec


def _source(origin: Dict[str, Path], key: str, path: Path) -> str:
    for k in (key, key.split("[")[0], key.rsplit(".", 1)[0]):
        if k in origin:
            return str(origin[k])
    sweep_key = key[len("sweep."):] if key.startswith("sweep.") else None
    if sweep_key and "sweep" in origin:
        return str(origin["sweep"])
    return str(path)


def _declared_output(path: Path, overrides: List[str]) -> Optional[str]:
    """The output.dir as written (command line first, then the spec chain), to tell relative from absolute."""
    given = parse_overrides(overrides).get("output.dir")
    if isinstance(given, str):
        return given
    for file in _chain_files(path):
        raw = _read_yaml(file)
        value = raw.get("output", {}).get("dir") if isinstance(raw.get("output"), dict) else None
        if isinstance(value, str):
            return value
    return None


def _chain_files(path: Path) -> List[Path]:
    files, current = [], path.resolve()
    while current is not None and current.is_file() and current not in files:
        files.append(current)
        base = _read_yaml(current).get("base")
        current = (current.parent / base).resolve() if isinstance(base, str) else None
    return files
