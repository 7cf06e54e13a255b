"""The training worker: load, quantize, add LoRA, train, checkpoint, evaluate, save. Plain PyTorch + HF.

``fit(spec, report, run)`` is the one entry. It never imports Ray: under Ray the runtime passes a
``report`` that wraps ``ray.train.report``; ``qlora-ray train`` and the tests pass their own.

Trial folder (``run.trial_dir``)::

    resolved_spec.yaml   metrics.jsonl   baseline.json   samples.md
    adapter/                     peft adapter (safetensors) + tokenizer + qlora_ray_spec.yaml
    checkpoints/step_<N>/        adapter, optimizer, scheduler, scaler, position, RNG states, manifest

A checkpoint is written to a temp folder and renamed into place, and carries a manifest of its
files' sizes and sha256, so a torn or corrupted one is detected on resume and an earlier one is
used instead (with a warning). Resuming restores the exact step, data position and RNG streams:
an interrupted and resumed run takes the same steps on the same batches as an uninterrupted one.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import random
import re
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from qlora_ray import data
from qlora_ray.errors import UserError, disk_full_error
from qlora_ray.files import publish_dir
from qlora_ray.evaluate import Baseline, measure, token_loss, write_samples
from qlora_ray.model import (add_lora, compute_dtype_of, device_of, gradient_checkpointing_on, load_base,
                             save_adapter, set_gradient_checkpointing)
from qlora_ray.spec import JobSpec, TrainSpec, to_yaml

log = logging.getLogger(__name__)

Report = Callable[[Dict, Optional[str]], None]
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2  # the newest two: if the last is torn, the one before still resumes
MANIFEST = "manifest.json"


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite: the trial stops instead of training on garbage."""

    def __init__(self, step: int, loss: float, what: str = "loss"):
        self.step, self.loss, self.what = step, loss, what
        super().__init__(
            f"step {step}: training {what} is {loss}; stopped rather than train on garbage. "
            "Lower train.lr, raise train.warmup_ratio, check the data, or use "
            "quantization.compute_dtype bf16/fp32 instead of fp16.")


@dataclass
class RunContext:
    """Where and how one trial runs (filled by the runtime or ``qlora-ray train``)."""

    trial_dir: str
    resume_from: Optional[str] = None   # a checkpoint folder (checkpoints/step_<N>)
    baseline: Optional[Baseline] = None  # base-model figures; measured here when None
    # Base figures measured elsewhere at the same time as this trial (the runtime's base-model
    # task): asked for once training is done; when it returns None (not ready, or failed) this
    # trial measures the base model itself, with its adapter switched off.
    base_figures: Optional[Callable[[], Optional[Baseline]]] = None
    progress: bool = False               # a progress bar on stderr
    # Share of the GPU's memory this process may take (several trials on one GPU): beyond it
    # a step runs out of memory here instead of starving its neighbours.
    gpu_memory_fraction: Optional[float] = None


@dataclass
class FitResult:
    """A finished trial's figures (also its final report, with ``done=True``)."""

    step: int
    total_steps: int
    train_loss: Optional[float]
    eval_ppl: Optional[float]
    base_ppl: Optional[float]
    ppl_change: Optional[float]
    eval_tokens: int
    tokens_per_s: float
    peak_mem_gb: float
    wall_s: float
    train_s: float
    adapter_dir: str
    samples_file: Optional[str]
    gradient_checkpointing: bool = False  # on at the end (``auto`` switches it on after an out-of-memory step)
    done: bool = True

    def metrics(self) -> Dict:
        return asdict(self)


@dataclass
class _State:
    """Everything a checkpoint needs besides tensors: position and running sums."""

    step: int = 0
    epoch: int = 0
    batch: int = 0          # next micro-batch within the epoch
    tokens: int = 0         # non-padding tokens trained on, all attempts
    train_s: float = 0.0    # time in the training loop, all attempts
    wall_s: float = 0.0     # fit() wall time up to the checkpoint, earlier attempts
    window: Dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "targets": 0, "tokens": 0, "s": 0.0})
    last_loss: Optional[float] = None


# ---------------------------------------------------------------- entry

def fit(spec: JobSpec, report: Report, run: RunContext) -> FitResult:
    """Train one trial of ``spec`` into ``run.trial_dir``; see the module docstring."""
    started = time.time()
    reset_peak_memory()
    trial_dir = Path(run.trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "resolved_spec.yaml").write_text(to_yaml(spec), encoding="utf-8")
    t = spec.train

    say = _say if run.progress else (lambda message: None)

    _seed(t.seed)
    say(f"loading {spec.model.name} ({spec.quantization.mode}) and the data ...")
    model, tokenizer = load_base(spec)
    prepared = data.prepare(spec.data, tokenizer)
    _seed(t.seed)
    model = add_lora(model, spec)
    device = device_of(model)
    if device.type == "cuda" and run.gpu_memory_fraction:
        torch.cuda.set_per_process_memory_fraction(run.gpu_memory_fraction, device)
    checkpoint = find_checkpoint(run.resume_from, trial_dir)
    baseline = run.baseline
    if baseline is None and run.base_figures is None:
        say(f"measuring the base model on {len(prepared.eval)} eval examples ...")
        baseline = _baseline(model, tokenizer, prepared, spec, trial_dir, reuse=checkpoint is not None)

    params = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = math.ceil(len(data.train_batches(prepared, spec.data, t.batch_size, 0, t.seed)) / t.grad_accum)
    total = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    optimizer = build_optimizer(t, params, device)
    scheduler = build_scheduler(optimizer, t, total)
    scaler = (torch.amp.GradScaler("cuda")
              if device.type == "cuda" and compute_dtype_of(model) == torch.float16 else None)

    state = _State()
    if checkpoint is not None:
        state = _restore(checkpoint, model, optimizer, scheduler, scaler)
        log.info("resumed from %s (step %d)", checkpoint, state.step)
    _forget_after(trial_dir, state.step)
    prior_wall = state.wall_s

    def now_wall() -> float:
        return prior_wall + time.time() - started

    bar = _progress(run.progress, total, state.step, spec.name)
    pad_id = tokenizer.pad_token_id
    epoch_len = 1
    model.train()
    while state.step < total:
        batches = data.train_batches(prepared, spec.data, t.batch_size, state.epoch, t.seed)
        epoch_len = len(batches)
        if epoch_len == 0:
            raise UserError("data.train: no training batches (is the training set empty?)")
        while state.batch < epoch_len and state.step < total:
            tick = time.perf_counter()
            group = [batches[j] for j in range(state.batch, min(state.batch + t.grad_accum, epoch_len))]
            lr = scheduler.get_last_lr()[0]
            loss_sum, targets, tokens = _step_with_fallback(model, group, optimizer, scheduler, scaler,
                                                            params, t, state.step + 1, pad_id, say)
            _sync(device)
            elapsed = time.perf_counter() - tick
            state.step += 1
            state.batch += len(group)
            state.tokens += tokens
            state.train_s += elapsed
            for key, value in (("loss", loss_sum), ("targets", targets), ("tokens", tokens), ("s", elapsed)):
                state.window[key] += value
            if state.batch >= epoch_len:
                state.epoch, state.batch = state.epoch + 1, 0
            bar.update(1)
            save = state.step % t.checkpoint_every == 0 or state.step == total
            if not (save or state.step % t.log_every == 0):
                continue
            # The row (which resets the running window) comes before the checkpoint, so a
            # resumed run continues with exactly the window an uninterrupted one has.
            row = _log_row(state, total, lr, epoch_len, device)
            state.last_loss = row["loss"]
            ckpt_dir = None
            if save:
                state.wall_s = now_wall()
                ckpt_dir = str(save_checkpoint(trial_dir, state, model, optimizer, scheduler, scaler))
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            _append(trial_dir / METRICS_FILE, row)
            report(row, ckpt_dir)
    bar.close()

    adapter_dir = save_adapter(model, tokenizer, spec, trial_dir / "adapter")
    if baseline is None:
        baseline = run.base_figures() if run.base_figures else None
    if baseline is None:
        say("measuring the base model (adapter off) ...")
        baseline = _baseline(model, tokenizer, prepared, spec, trial_dir, reuse=True)
    say("measuring the tuned model ...")
    tuned = measure(model, tokenizer, prepared, spec)
    samples = None
    if tuned.prompts:
        samples = str(write_samples(trial_dir / "samples.md", tuned.prompts, baseline.replies, tuned.replies))
    base_ppl, eval_ppl = baseline.perplexity, tuned.perplexity
    result = FitResult(
        step=state.step, total_steps=total, train_loss=state.last_loss,
        eval_ppl=eval_ppl, base_ppl=base_ppl,
        ppl_change=(eval_ppl / base_ppl - 1.0) if eval_ppl and base_ppl else None,
        eval_tokens=tuned.target_tokens,
        tokens_per_s=state.tokens / state.train_s if state.train_s else 0.0,
        peak_mem_gb=peak_memory_gb(device), wall_s=now_wall(), train_s=state.train_s,
        adapter_dir=str(adapter_dir), samples_file=samples, gradient_checkpointing=gradient_checkpointing_on(model))
    final = {**result.metrics(), "epoch": round(state.epoch + state.batch / max(1, epoch_len), 4)}
    _append(trial_dir / METRICS_FILE, final)
    report(final, None)
    return result


class OutOfMemory(RuntimeError):
    """A step ran out of GPU memory with activation recomputation already on."""

    def __init__(self, step: int, error: BaseException):
        super().__init__(
            f"step {step}: out of GPU memory with gradient checkpointing on ({str(error).splitlines()[0]}). "
            "Lower train.batch_size (raise train.grad_accum to keep the step size) or data.max_seq_len, "
            "or give each trial more of a GPU (resources.gpus_per_trial).")


def _step_with_fallback(model, group, optimizer, scheduler, scaler, params, t: TrainSpec, step: int,
                        pad_id: int, say) -> tuple:
    """``_step``; with ``gradient_checkpointing: auto``, a step that runs out of GPU memory is
    retried once with checkpointing switched on, which stays on for the rest of the run."""
    try:
        return _step(model, group, optimizer, scheduler, scaler, params, t, step, pad_id)
    except torch.OutOfMemoryError as e:
        if t.checkpointing != "auto" or gradient_checkpointing_on(model):
            raise OutOfMemory(step, e) from None
        message = str(e).splitlines()[0]
    # Outside the handler, so the failed step's tensors (held by the traceback) are freed first.
    optimizer.zero_grad(set_to_none=True)
    reset_peak_memory()  # the failed attempt's peak is not what the run needs from here on
    log.warning("step %d ran out of GPU memory (%s); gradient checkpointing is on from now on", step, message)
    say(f"step {step}: out of GPU memory without gradient checkpointing; retrying with it on")
    set_gradient_checkpointing(model, True)
    try:
        return _step(model, group, optimizer, scheduler, scaler, params, t, step, pad_id)
    except torch.OutOfMemoryError as e:
        raise OutOfMemory(step, e) from None


def _step(model, group: List[dict], optimizer, scheduler, scaler, params, t: TrainSpec, step: int,
          pad_id: int) -> tuple:
    """One optimizer step over a group of micro-batches; the loss is the token-weighted mean
    over the whole group (each micro-batch's summed loss is divided by the group's target count)."""
    targets = sum(int((b["labels"][:, 1:] != data.IGNORE).sum()) for b in group)
    tokens = sum(int((b["input_ids"] != pad_id).sum()) for b in group)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for batch in group:
        loss_sum, _ = token_loss(model, batch)
        value = float(loss_sum.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(step, value)
        total += value
        scaled = loss_sum / max(1, targets)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if t.max_grad_norm > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
        # With a scaler an inf gradient is expected now and then: the scaler skips that step.
        if scaler is None and not math.isfinite(norm):
            raise NonFiniteLossError(step, norm, "gradient norm")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    return total, targets, tokens


def _baseline(model, tokenizer, prepared, spec: JobSpec, trial_dir: Path, reuse: bool) -> Baseline:
    """Base-model figures from the model in hand (adapters switched off); saved for resumes."""
    path = trial_dir / "baseline.json"
    if reuse and path.is_file():
        return Baseline.from_json(path.read_text(encoding="utf-8"))
    with model.disable_adapter():
        baseline = measure(model, tokenizer, prepared, spec)
    path.write_text(baseline.to_json(), encoding="utf-8")
    return baseline


def _log_row(state: _State, total: int, lr: float, epoch_len: int, device) -> Dict:
    w = state.window
    row = {"step": state.step, "total_steps": total,
           "epoch": round(state.epoch + state.batch / max(1, epoch_len), 4),
           "loss": w["loss"] / w["targets"] if w["targets"] else float("nan"),
           "lr": lr, "tokens_per_s": w["tokens"] / w["s"] if w["s"] else 0.0,
           "peak_mem_gb": peak_memory_gb(device), "train_s": state.train_s, "tokens": state.tokens}
    state.window = {"loss": 0.0, "targets": 0, "tokens": 0, "s": 0.0}
    return row


# ---------------------------------------------------------------- optimizer and schedule

def build_optimizer(t: TrainSpec, params, device) -> torch.optim.Optimizer:
    """AdamW: ``auto`` is bitsandbytes' paged 8-bit AdamW on CUDA and torch's AdamW on the CPU."""
    name = t.optimizer
    if name == "auto":
        name = "paged_adamw_8bit" if device.type == "cuda" else "adamw"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    if name == "paged_adamw_8bit" and device.type != "cuda":
        raise UserError("train.optimizer: paged_adamw_8bit pages optimizer state through CUDA memory; "
                        "on the CPU use adamw (or auto)")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def lr_factor(step: int, t: TrainSpec, total: int) -> float:
    """The learning-rate multiplier for optimizer step ``step`` (0-based): linear warmup reaching
    the peak on the last warmup step, then cosine or linear decay towards 0, or constant."""
    warmup = math.ceil(t.warmup_ratio * total) if t.warmup_ratio > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    if t.scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if t.scheduler == "cosine" else 1.0 - progress


def build_scheduler(optimizer, t: TrainSpec, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t, total))


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(trial_dir: Path, state: _State, model, optimizer, scheduler, scaler) -> Path:
    """Write ``checkpoints/step_<N>/`` atomically (temp folder, manifest, rename); keep the newest two.

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

    root = trial_dir / CHECKPOINTS
    final = root / f"step_{state.step}"
    try:
        with publish_dir(final) as tmp:
            # Adapter weights only: peft would add the (tied) embeddings when the vocabulary grew
            # by a pad token; load_base rebuilds those rows deterministically.
            adapter = get_peft_model_state_dict(model, save_embedding_layers=False)
            weights = {k: v.detach().contiguous().cpu() for k, v in adapter.items()}
            write(tmp / "adapter_model.safetensors", safetensors_bytes(weights))
            write_torch(optimizer.state_dict(), tmp / "optimizer.pt")
            write_torch(scheduler.state_dict(), tmp / "scheduler.pt")
            if scaler is not None:
                write_torch(scaler.state_dict(), tmp / "scaler.pt")
            write_torch(_rng_state(), tmp / "rng.pt")
            write(tmp / "state.json", json.dumps(asdict(state), indent=1).encode("utf-8"))
            files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
            write(tmp / MANIFEST, json.dumps({"step": state.step, "files": files}, indent=1).encode("utf-8"))
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
    root = Path(trial_dir) / CHECKPOINTS
    found = [p for p in root.glob("step_*") if p.is_dir() and _step_of(p) is not None] if root.is_dir() else []
    return sorted(found, key=_step_of)


def checkpoint_problem(path) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be used, or None when its manifest checks out."""
    path = Path(path)
    manifest = path / MANIFEST
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
        if candidate.resolve() == given.resolve() or (step is not None and _step_of(candidate) > step):
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
    step = _step_of(path)
    if step is not None:
        return step
    for name, key in ((MANIFEST, "step"), ("state.json", "step")):
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
    candidates = [c for c in checkpoints(trial_dir) if _step_of(c) > above and c.resolve() != skip.resolve()]
    if not candidates:
        return None
    logged = _logged_steps(Path(trial_dir))
    for candidate in reversed(candidates):
        if logged is not None and _step_of(candidate) not in logged:
            log.warning("checkpoint %s has no row in %s (cut off while being recorded); not resuming from it",
                        candidate, METRICS_FILE)
            continue
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        log.warning("checkpoint %s is unusable: %s", candidate, problem)
    return None


def _logged_steps(trial_dir: Path) -> Optional[set]:
    """Steps with a (non-final) row in the trial's ``metrics.jsonl``; None when there is no file."""
    path = trial_dir / METRICS_FILE
    if not path.is_file():
        return None
    steps = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and not row.get("done") and isinstance(row.get("step"), int):
            steps.add(row["step"])
    return steps


def latest_checkpoint(trial_dir) -> Optional[Path]:
    """The newest sound checkpoint of a trial folder (earlier ones tried if it is torn), or None."""
    found = checkpoints(Path(trial_dir))
    return find_checkpoint(str(found[-1]), Path(trial_dir)) if found else None


def _restore(path: Path, model, optimizer, scheduler, scaler) -> _State:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    device = device_of(model)
    set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors"), device=str(device)))
    # Our own files, written by save_checkpoint (optimizer states hold non-tensor objects).
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return _State(**json.loads((path / "state.json").read_text(encoding="utf-8")))


def _forget_after(trial_dir: Path, step: int) -> None:
    """Drop what a run beyond ``step`` left behind (its checkpoints and metric rows): the run
    restarts from ``step``, and the leaderboard must not mix two histories."""
    for old in checkpoints(trial_dir):
        if _step_of(old) > step:
            shutil.rmtree(old, ignore_errors=True)
    path = trial_dir / METRICS_FILE
    if path.is_file():
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not row.get("done") and row.get("step", 0) <= step:
                keep.append(line + "\n")
        path.write_text("".join(keep), encoding="utf-8")


def _step_of(path: Path) -> Optional[int]:
    match = re.fullmatch(r"step_(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _rng_state() -> Dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- small helpers

def peak_memory_gb(device) -> float:
    """Peak memory since ``reset_peak_memory``: CUDA ``max_memory_allocated`` on a GPU, peak RSS
    on the CPU (Linux's VmHWM; elsewhere the process's lifetime peak)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss * 1024 / 2**30


def reset_peak_memory() -> None:
    """Start a new peak for ``peak_memory_gb``: a process that ran an earlier trial (Tune hands
    finished trial processes on) frees what that one left cached and forgets its peak."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _append(path: Path, row: Dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def _progress(enabled: bool, total: int, initial: int, name: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"train {name}", unit="step", dynamic_ncols=True)
