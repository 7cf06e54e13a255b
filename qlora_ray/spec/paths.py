"""Paths in a spec: anchored to the file that wrote them, then checked on disk (data files
that exist and hold rows, an output folder this user can write)."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from qlora_ray.spec.fields import HUB_OUTPUT, HUB_SCHEME, URI_SCHEMES, Problem, show
from qlora_ray.spec.job import JobSpec
from qlora_ray.spec.schema import get_path

# The keys that hold paths, anchored to the spec file that wrote them.
PATH_KEYS = ("data.train", "data.eval", "eval.prompts", "output.dir", "model.name", "data.cache_dir",
             "data.test", "eval.control")


def _is_uri(value: str) -> bool:
    return value.startswith("hf://") or value.startswith(URI_SCHEMES)


def _looks_local(key: str, value: str, anchor: Path) -> bool:
    if key != "model.name":
        return True
    # A model name is a path when it says so or exists on disk; otherwise a hub id or alias.
    return (value.startswith((".", "/", "~")) or value.endswith(".gguf")
            or (anchor / value).exists())


def anchor_paths(raw: Dict[str, Any], anchor: Path) -> Dict[str, Any]:
    """A copy of one file's raw tree with its local paths (swept ones too) made absolute against ``anchor``."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key in PATH_KEYS:
        section, leaf = key.split(".")
        value = out.get(section, {}).get(leaf) if isinstance(out.get(section), dict) else None
        out_value = _anchor_path(key, value, anchor)
        if out_value is not value:
            out[section][leaf] = out_value
        # Swept paths are relative to the file that wrote them, like any other path.
        swept = out["sweep"].get(key) if isinstance(out.get("sweep"), dict) else None
        if isinstance(swept, list):
            out["sweep"] = {**out["sweep"], key: [_anchor_path(key, v, anchor) for v in swept]}
    return out


def _anchor_path(key: str, value: Any, anchor: Path) -> Any:
    """``value`` made absolute against ``anchor`` when it is a local path (else unchanged)."""
    if not isinstance(value, str) or not value or _is_uri(value) or "://" in value or "${" in value:
        return value  # a URI of an unknown scheme stays as typed, so validation can name it
    if key == "data.cache_dir" or value.startswith("~"):
        value = os.path.expanduser(value)
    if key == "data.cache_dir" and not os.path.isabs(value):
        return value
    if _looks_local(key, value, anchor):
        return os.path.normpath(str(anchor / value))
    return value


def project_root(start: Path) -> Path:
    """The nearest folder above ``start`` holding pyproject.toml or .git (else ``start``)."""
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").exists() or (folder / ".git").exists():
            return folder
    return start


def file_problems(spec: JobSpec, path: Path, declared: Optional[str]) -> Iterator[Problem]:
    """What is wrong with the files and folders ``spec`` names (``declared``: output.dir as written)."""
    for key in ("data.train", "data.eval", "data.test", "eval.control"):
        value = get_path(spec, key)
        if not value or value == "_missing_" or value.startswith("hf://"):
            continue
        files = [f for f in glob.glob(value, recursive=True) if os.path.isfile(f)]
        if not files and not glob.glob(value):
            yield key, f"no file matches '{show(value)}'; check the path (relative paths are relative to the spec file)"
        elif files and all(os.path.getsize(f) == 0 for f in files):
            yield key, f"'{show(value)}' is empty; it must hold rows (one JSON object per line, or CSV/Parquet rows)"
    if spec.eval.prompts and not Path(spec.eval.prompts).is_file():
        yield "eval.prompts", f"file '{spec.eval.prompts}' not found"
    name = spec.model.name
    if (name.startswith(("/", ".")) or name.endswith(".gguf")) and not Path(name).exists():
        yield "model.name", f"local model '{name}' not found"
    out = spec.output.dir
    if out.startswith(HUB_SCHEME):
        yield from hub_output_problems(out)
    elif "://" in out and not _is_uri(out):
        yield "output.dir", (f"'{show(out)}': unknown storage scheme '{out.split('://')[0]}://'; use a path, "
                             f"hf://datasets/<user>/<repo>, or one of {', '.join(URI_SCHEMES)}")
    elif not _is_uri(out):
        root = project_root(path.resolve().parent)
        if declared is not None and not Path(declared).is_absolute() and not Path(out).resolve().is_relative_to(root):
            yield "output.dir", f"'{declared}' climbs out of the project ({root}); use a path inside it, an absolute path or a storage URI"
        else:
            yield from _writable_folder_problems(Path(out))


def hub_output_problems(out: str) -> Iterator[Problem]:
    """An ``hf://`` output.dir must name a dataset repo or a bucket (a folder inside is allowed)."""
    if not HUB_OUTPUT.fullmatch(out.rstrip("/")):
        yield "output.dir", (f"'{show(out)}' is not a Hub folder qlora-ray can write; use "
                             "hf://datasets/<user>/<repo>[/folder] (a dataset repo) or "
                             "hf://buckets/<user>/<bucket>[/folder]")


def _writable_folder_problems(out: Path) -> Iterator[Problem]:
    """``output.dir`` must be a folder this user can write, or creatable in one."""
    if out.exists() and not out.is_dir():
        yield "output.dir", f"'{show(str(out))}' is a file, not a folder; point output.dir at a folder"
        return
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        yield "output.dir", f"'{show(str(existing))}' is a file, so '{show(str(out))}' cannot be created in it"
    elif not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == out else f"cannot be created: '{show(str(existing))}' is not writable"
        yield "output.dir", f"'{show(str(out))}' {what} by this user; choose another output.dir"
