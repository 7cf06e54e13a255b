"""Whether a checkpoint may be resumed under the spec in hand.

A checkpoint carries the resolved spec it was trained under (``spec.yaml`` beside its weights).
Resuming it under another spec would continue the old optimizer and schedule while the trial
folder claims the new values (or die on mismatched tensor shapes), so a resume is allowed only
when the two specs agree outside the keys below: how long to train, where and with what to run,
and evaluation, none of which changes a step already taken. No torch, no Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from qlora_ray.errors import UserError
from qlora_ray.spec import JobSpec, to_yaml

# Dotted keys (a trailing dot: a whole section) that may differ between a checkpoint and a resume.
RESUMABLE_KEYS = ("train.max_steps", "train.log_every", "train.checkpoint_every", "eval.", "resources.",
                  "output.", "sweep", "base", "name", "data.cache_dir", "model.trust_remote_code")


class SpecMismatchError(UserError):
    """A checkpoint was made under a spec that differs in keys that change training."""


def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: Dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def _may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) or key.startswith(f"{k}.")
               for k in RESUMABLE_KEYS)


def resume_changes(saved_yaml: str, spec: JobSpec) -> List[str]:
    """``key: old -> new`` for each key outside :data:`RESUMABLE_KEYS` that differs."""
    import yaml

    old = _flat(yaml.safe_load(saved_yaml) or {})
    new = _flat(yaml.safe_load(to_yaml(spec)) or {})
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if not _may_change(key) and old.get(key) != new.get(key)]


def check_resume(checkpoint: Path, spec: JobSpec, spec_file: str, fallback: Optional[Path] = None) -> None:
    """Raise :class:`SpecMismatchError` when ``checkpoint`` was made under a spec that differs from
    ``spec`` in a key that changes training. Its spec is ``checkpoint/spec_file``; a checkpoint
    written before checkpoints carried one is checked against ``fallback`` (the trial's
    ``resolved_spec.yaml``) when that exists."""
    source = Path(checkpoint) / spec_file
    if not source.is_file():
        if fallback is None or not Path(fallback).is_file():
            return
        source = Path(fallback)
    changes = resume_changes(source.read_text(encoding="utf-8"), spec)
    if changes:
        raise SpecMismatchError(
            f"{checkpoint} was trained under a different spec ({source}):\n  "
            + "\n  ".join(changes[:12]) + ("\n  ..." if len(changes) > 12 else "")
            + "\nResuming it would continue the old run under the new values. Start this trial over with "
              "--fresh (the old trial folder is moved aside, not deleted), change the keys back, or give "
              "the job another name (name=...).")
