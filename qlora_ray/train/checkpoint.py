"""Checkpoints of a trial: ``<trial>/checkpoints/step_<N>/`` with the adapter, optimizer,
schedule, scaler, position and RNG states, and a manifest of sizes and sha256.

A checkpoint is written to a temp folder and renamed into place, so a torn or corrupted one is
detected on resume and an earlier one is used instead (with a warning). Its ``.pt`` files hold
only tensors and plain data (RNG states included) and are loaded with ``weights_only=True``:
a file carrying pickled objects is refused, never run. Resuming restores the
exact step, data position and RNG streams: an interrupted and resumed run takes the same steps
on the same batches as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from qlora_ray import layout
from qlora_ray.errors import UserError, disk_full_error
from qlora_ray.files import publish_dir, write_text
from qlora_ray.layout import step_of
from qlora_ray.model import device_of
from qlora_ray.records import read_metrics, to_line
from qlora_ray.train.optim import TrainParts

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2  # the newest two: if the last is torn, the one before still resumes


@dataclass
class TrainState:
    """Everything a checkpoint needs besides tensors: position and running sums."""

    step: int = 0
    epoch: int = 0
    batch: int = 0          # next micro-batch within the epoch
    tokens: int = 0         # non-padding tokens trained on, all attempts
    train_s: float = 0.0    # time in the training loop, all attempts
    wall_s: float = 0.0     # fit() wall time up to the checkpoint, earlier attempts
    window: Dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "targets": 0, "tokens": 0, "s": 0.0})
    last_loss: Optional[float] = None
    best_eval_ppl: Optional[float] = None  # lowest periodic eval perplexity so far (eval.keep best)
    best_step: Optional[int] = None



def save_checkpoint(trial_dir: Path, state: TrainState, parts: TrainParts, spec_yaml: Optional[str] = None) -> Path:
    """Write ``checkpoints/step_<N>/`` atomically (temp folder, manifest, rename); keep the newest two.
    ``spec_yaml`` (the resolved spec) is stored with it: a resume checks it against its own.

    Every file is serialized in memory and written with plain Python I/O, so a full disk is an
    ``OSError`` with its errno (torch's own writer reports it as ``unexpected pos``). A full
    disk or quota raises :class:`~qlora_ray.errors.DiskFullError` saying where; whatever fails,
    the temp folder is removed and the earlier checkpoints are left as they were.
    """
    import io

    from peft import get_peft_model_state_dict
    from safetensors.torch import save as safetensors_bytes

    def write(path: Path, blob) -> None:
        with open(path, "wb") as f:
            f.write(blob)

    def write_torch(obj, path: Path) -> None:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        write(path, buffer.getbuffer())

    final = layout.checkpoint_dir(trial_dir, state.step)
    root = final.parent
    try:
        with publish_dir(final) as tmp:
            # Adapter weights only: peft would add the (tied) embeddings when the vocabulary grew
            # by a pad token; load_base rebuilds those rows deterministically.
            adapter = get_peft_model_state_dict(parts.model, save_embedding_layers=False)
            weights = {k: v.detach().contiguous().cpu() for k, v in adapter.items()}
            write(tmp / layout.ADAPTER_WEIGHTS, safetensors_bytes(weights))
            write_torch(parts.optimizer.state_dict(), tmp / layout.OPTIMIZER_FILE)
            write_torch(parts.scheduler.state_dict(), tmp / layout.SCHEDULER_FILE)
            if parts.scaler is not None:
                write_torch(parts.scaler.state_dict(), tmp / layout.SCALER_FILE)
            write_torch(_rng_state(), tmp / layout.RNG_FILE)
            write(tmp / layout.STATE_FILE, json.dumps(asdict(state), indent=1).encode("utf-8"))
            if spec_yaml is not None:
                write(tmp / layout.CHECKPOINT_SPEC_FILE, spec_yaml.encode("utf-8"))
            files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
            write(tmp / layout.MANIFEST_FILE, json.dumps({"step": state.step, "files": files}, indent=1).encode("utf-8"))
    except BaseException as e:
        full = disk_full_error(e, f"checkpoint step_{state.step}", root)
        if full is None:
            raise
        raise full from e
    for old in checkpoints(trial_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(trial_dir: Path) -> List[Path]:
    """The trial's checkpoint folders, oldest step first (temp folders excluded)."""
    root = Path(trial_dir) / layout.CHECKPOINTS_DIR
    found = [p for p in root.glob("step_*") if p.is_dir() and step_of(p) is not None] if root.is_dir() else []
    return sorted(found, key=step_of)


def checkpoint_problem(path) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be used, or None when its manifest checks out."""
    path = Path(path)
    manifest = path / layout.MANIFEST_FILE
    if not manifest.is_file():
        return "no manifest (half-written?)"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if _sha256(f) != meta["sha256"]:
            return f"{name} does not match its sha256"
    return None


def find_checkpoint(resume_from: Optional[str], trial_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from, or None to start fresh.

    ``resume_from`` (what Ray Train hands back) when it is sound and the trial's ``checkpoints/``
    holds nothing newer. After a driver kill Ray can hand back an older checkpoint than the
    worker last wrote (its record lags the reports), so the newest sound checkpoint in the trial
    folder with a higher step wins, provided ``metrics.jsonl`` has that step's row (the row is
    written right after the checkpoint; without it the history would have a gap). When
    ``resume_from`` is unusable: the newest sound one in the trial folder (with warnings).
    """
    if not resume_from:
        return None
    given = Path(resume_from)
    problem = checkpoint_problem(given)
    step = _checkpoint_step(given)
    newer = _newest_sound(trial_dir, above=step, skip=given) if step is not None else None
    if problem is None:
        if newer is not None:
            log.warning("checkpoint %s (step %d) is older than %s in the trial folder; resuming from that one",
                        resume_from, step, newer)
            return newer
        return given
    log.warning("checkpoint %s is unusable: %s; looking for another one", resume_from, problem)
    if newer is not None:
        log.warning("resuming from the newer checkpoint %s instead", newer)
        return newer
    for candidate in reversed(checkpoints(trial_dir)):
        if candidate.resolve() == given.resolve() or (step is not None and step_of(candidate) > step):
            continue  # the same folder, or newer ones _newest_sound already turned down
        other = checkpoint_problem(candidate)
        if other is None:
            log.warning("resuming from the earlier checkpoint %s instead", candidate)
            return candidate
        log.warning("checkpoint %s is unusable too: %s", candidate, other)
    log.warning("no usable checkpoint; training starts from step 0")
    return None


def _checkpoint_step(path: Path) -> Optional[int]:
    """The step of a checkpoint folder: from its name (``step_<N>``), else from its manifest or
    state (Ray Train's copies are named ``checkpoint_<index>``)."""
    step = step_of(path)
    if step is not None:
        return step
    for name, key in ((layout.MANIFEST_FILE, "step"), (layout.STATE_FILE, "step")):
        try:
            value = json.loads((path / name).read_text(encoding="utf-8"))[key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(value, int):
            return value
    return None


def _newest_sound(trial_dir: Path, above: int, skip: Path) -> Optional[Path]:
    """The newest sound checkpoint of the trial folder with a step above ``above`` whose step
    has its row in ``metrics.jsonl`` (when there is one), or None."""
    candidates = [c for c in checkpoints(trial_dir) if step_of(c) > above and c.resolve() != skip.resolve()]
    if not candidates:
        return None
    logged = _logged_steps(Path(trial_dir))
    for candidate in reversed(candidates):
        if logged is not None and step_of(candidate) not in logged:
            log.warning("checkpoint %s has no row in %s (cut off while being recorded); not resuming from it",
                        candidate, layout.METRICS_FILE)
            continue
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        log.warning("checkpoint %s is unusable: %s", candidate, problem)
    return None


def _logged_steps(trial_dir: Path) -> Optional[set]:
    """Steps with a row in the trial's ``metrics.jsonl``; None when there is no file."""
    path = trial_dir / layout.METRICS_FILE
    if not path.is_file():
        return None
    return {row.step for row in read_metrics(path)}


def latest_checkpoint(trial_dir) -> Optional[Path]:
    """The newest sound checkpoint of a trial folder (earlier ones tried if it is torn), or None."""
    found = checkpoints(Path(trial_dir))
    return find_checkpoint(str(found[-1]), Path(trial_dir)) if found else None


def load_adapter_weights(model, folder: Path) -> Path:
    """The LoRA weights of a saved adapter (or checkpoint) folder into ``model``; the folder."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(Path(folder) / layout.ADAPTER_WEIGHTS),
                                               device=str(device_of(model))))
    return Path(folder)


def restore(path: Path, parts: TrainParts) -> TrainState:
    """Load a checkpoint into ``parts``; the position and running sums it was saved at."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    device = device_of(parts.model)
    set_peft_model_state_dict(parts.model, load_file(str(path / layout.ADAPTER_WEIGHTS), device=str(device)))
    parts.optimizer.load_state_dict(_load_data(path / layout.OPTIMIZER_FILE, map_location=device))
    parts.scheduler.load_state_dict(_load_data(path / layout.SCHEDULER_FILE))
    if parts.scaler is not None and (path / layout.SCALER_FILE).is_file():
        parts.scaler.load_state_dict(_load_data(path / layout.SCALER_FILE))
    _set_rng_state(_load_data(path / layout.RNG_FILE))
    return TrainState(**json.loads((path / layout.STATE_FILE).read_text(encoding="utf-8")))


class UnsafeCheckpointError(UserError):
    """A checkpoint file holds more than tensors and plain data: loading it could run code."""


def _load_data(path: Path, map_location=None):
    """A ``.pt`` file of a checkpoint, loaded with ``weights_only=True``: tensors, numbers,
    strings, lists and dicts only. A checkpoint folder may be shared (NFS, a bucket) and its
    manifest proves no more than that nothing was damaged, so a pickled object is refused, never run."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "an unknown object")
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain data, which "
            f"could run code ({found[:200]}). qlora-ray never writes such files: this "
            "checkpoint was written by something else or tampered with. Nothing from it was run. Delete "
            f"{path.parent} (or start over: --fresh) and check who can write to the output folder.") from None


def forget_after(trial_dir: Path, step: int) -> None:
    """Drop what a run beyond ``step`` left behind (its checkpoints and metric rows): the run
    restarts from ``step``, and the leaderboard must not mix two histories."""
    for old in checkpoints(trial_dir):
        if step_of(old) > step:
            shutil.rmtree(old, ignore_errors=True)
    path = trial_dir / layout.METRICS_FILE
    if path.is_file():
        # Atomically: a crash here leaves the old history, never half of it.
        write_text(path, "".join(to_line(row) for row in read_metrics(path) if row.step <= step))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _rng_state() -> Dict:
    """Every RNG stream as tensors, numbers and lists (what ``weights_only`` loading accepts)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "internal": list(internal), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
