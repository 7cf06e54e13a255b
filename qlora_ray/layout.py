"""Every file and folder name qlora-ray writes or looks for, in one place.

An experiment (``<output.dir>/<name>/``, a folder or a storage URI)::

    experiment.json  spec.yaml  baseline.json  job.json     the plan, the spec, base figures, a --detach job
    leaderboard.{md,csv,json,png}  best -> <trial id>        results (``best.txt`` on a URI)
    _ray/<name>/   _ray/train/<trial id>/                    Tune's and Ray Train's own state
    <trial id>/                                              one folder per trial:
        status.json   result.json   metrics.jsonl   events.jsonl   resolved_spec.yaml
        baseline.json   samples.md   adapter/   checkpoints/step_<N>/

``status.json`` is the runtime's (state, reason, wall time); ``result.json`` the trial's final
figures (written once, by the training code); ``metrics.jsonl`` one row per logged step.
Pure names and path joins: no I/O, no torch, no Ray.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

# ---------------------------------------------------------------- experiment folder
EXPERIMENT_FILE = "experiment.json"
SPEC_FILE = "spec.yaml"
BASELINE_FILE = "baseline.json"
JOB_FILE = "job.json"
TEST_FILE = "test.json"  # the best trial measured on data.test
LEADERBOARD = "leaderboard"
LEADERBOARD_SUFFIXES = ("md", "csv", "json", "png")
BEST_LINK = "best"
BEST_FILE = "best.txt"  # what stands for the ``best`` link on a storage URI
RAY_DIR = "_ray"
RAY_TRAIN_DIR = f"{RAY_DIR}/train"
RUNS_DIR = "runs"  # where a bare experiment name is looked for
# Folders of an experiment that are never trials.
TENSORBOARD_DIR = "tensorboard"  # one folder per trial: point `tensorboard --logdir` here
WANDB_DIR = "wandb"              # W&B's offline runs (`wandb sync` uploads them)
NOT_TRIALS = frozenset({RAY_DIR, BEST_LINK, TENSORBOARD_DIR, WANDB_DIR})

# ---------------------------------------------------------------- trial folder
STATUS_FILE = "status.json"
RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
RESOLVED_SPEC_FILE = "resolved_spec.yaml"
SAMPLES_FILE = "samples.md"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
TRACKING_FILE = "tracking.json"  # what the experiment trackers could not log
# A trial folder holds at least one of these once it has started.
TRIAL_MARKERS = (STATUS_FILE, METRICS_FILE, RESOLVED_SPEC_FILE)

# ---------------------------------------------------------------- a checkpoint (checkpoints/step_<N>/)
MANIFEST_FILE = "manifest.json"
STATE_FILE = "state.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
RNG_FILE = "rng.pt"
CHECKPOINT_SPEC_FILE = "spec.yaml"  # the resolved spec the checkpoint was trained under
_STEP_DIR = re.compile(r"step_(\d+)")

# ---------------------------------------------------------------- an adapter folder
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SPEC_FILE = "qlora_ray_spec.yaml"
MERGE_CHECK_FILE = "merge_check.json"

# ---------------------------------------------------------------- an export folder (qlora-ray export)
EXPORT_CHECK_FILE = "export_check.json"
MODELFILE = "Modelfile"  # Ollama's

# ---------------------------------------------------------------- elsewhere
CACHE_ROOT = Path.home() / ".cache" / "qlora-ray"
STAGING_DIR = "qlora-ray"  # under the system temp folder: a URI experiment's trial, staged locally
HUB_STAGING = CACHE_ROOT / "hub"  # an hf:// output.dir's local mirror, one folder per URI
SYNC_FILE = ".qlora-ray-sync.json"  # in a mirrored experiment: which push the folder holds


def checkpoint_dir(trial_dir: Path, step: int) -> Path:
    """``<trial>/checkpoints/step_<step>``."""
    return Path(trial_dir) / CHECKPOINTS_DIR / f"step_{step}"


def step_of(path) -> Optional[int]:
    """The step in a ``step_<N>`` folder name, or None for any other name."""
    match = _STEP_DIR.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def leaderboard_file(suffix: str) -> str:
    return f"{LEADERBOARD}.{suffix}"


def trial_file(trial_id: str, name: str) -> str:
    """A file of a trial, relative to the experiment (``<trial id>/<name>``)."""
    return f"{trial_id}/{name}"


def experiment_cache(exp: str) -> Path:
    """Where a storage URI's experiment is mirrored to be read here."""
    return CACHE_ROOT / "experiments" / _folder_name(exp)


def hub_staging(output_dir: str) -> Path:
    """The local folder an ``hf://`` output.dir is mirrored in (the same for the same URI)."""
    return HUB_STAGING / _folder_name(output_dir.rstrip("/"))


def _folder_name(uri: str) -> str:
    """``uri`` as one folder name: every character but letters, digits and ``-_.`` made ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in uri)
