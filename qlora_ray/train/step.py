"""One optimizer step: the model's loss over a group of micro-batches, backward, clip, step.

``model_loss`` is the one place the step runs the model forward; a different forward (a fused
LoRA kernel, say) replaces that function and nothing else.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from qlora_ray import data
from qlora_ray.loss import token_loss
from qlora_ray.model import gradient_checkpointing_on, set_gradient_checkpointing
from qlora_ray.spec import TrainSpec
from qlora_ray.train.memory import reset_peak_memory
from qlora_ray.train.optim import TrainParts

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite: the trial stops instead of training on garbage."""

    def __init__(self, step: int, loss: float, what: str = "loss"):
        self.step, self.loss, self.what = step, loss, what
        super().__init__(
            f"step {step}: training {what} is {loss}; stopped rather than train on garbage. "
            "Lower train.lr, raise train.warmup_ratio, check the data, or use "
            "quantization.compute_dtype bf16/fp32 instead of fp16.")


class OutOfMemory(RuntimeError):
    """A step ran out of GPU memory with activation recomputation already on."""

    def __init__(self, step: int, error: BaseException):
        super().__init__(
            f"step {step}: out of GPU memory with gradient checkpointing on ({str(error).splitlines()[0]}). "
            "Lower train.batch_size (raise train.grad_accum to keep the step size) or data.max_seq_len, "
            "or give each trial more of a GPU (resources.gpus_per_trial).")


@dataclass
class StepOutcome:
    """What one step trained on: summed loss, target tokens, non-padding tokens."""

    loss_sum: float
    targets: int
    tokens: int


def model_loss(model, batch: dict, compute_dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, int]:
    """The model forward of a training step: summed token loss over the batch and its target count."""
    return token_loss(model, batch, compute_dtype)


def step(parts: TrainParts, group: List[dict], t: TrainSpec, number: int, pad_id: int) -> StepOutcome:
    """Optimizer step ``number`` over a group of micro-batches; the loss is the token-weighted mean
    over the whole group (each micro-batch's summed loss is divided by the group's target count)."""
    targets = sum(int((b["labels"][:, 1:] != data.IGNORE).sum()) for b in group)
    tokens = sum(int((b["input_ids"] != pad_id).sum()) for b in group)
    optimizer, scaler = parts.optimizer, parts.scaler
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for batch in group:
        loss_sum, _ = model_loss(parts.model, batch, parts.compute_dtype)
        value = float(loss_sum.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(number, value)
        total += value
        scaled = loss_sum / max(1, targets)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if t.max_grad_norm > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(parts.params, t.max_grad_norm))
        # With a scaler an inf gradient is expected now and then: the scaler skips that step.
        if scaler is None and not math.isfinite(norm):
            raise NonFiniteLossError(number, norm, "gradient norm")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    parts.scheduler.step()
    return StepOutcome(total, targets, tokens)


def step_with_fallback(parts: TrainParts, group: List[dict], t: TrainSpec, number: int, pad_id: int,
                       say: Callable[[str], None]) -> StepOutcome:
    """``step``; with ``gradient_checkpointing: auto``, a step that runs out of GPU memory is
    retried once with checkpointing switched on, which stays on for the rest of the run."""
    try:
        return step(parts, group, t, number, pad_id)
    except torch.OutOfMemoryError as e:
        if t.checkpointing != "auto" or gradient_checkpointing_on(parts.model):
            raise OutOfMemory(number, e) from None
        message = str(e).splitlines()[0]
    # Outside the handler, so the failed step's tensors (held by the traceback) are freed first.
    parts.optimizer.zero_grad(set_to_none=True)
    reset_peak_memory()  # the failed attempt's peak is not what the run needs from here on
    log.warning("step %d ran out of GPU memory (%s); gradient checkpointing is on from now on", number, message)
    say(f"step {number}: out of GPU memory without gradient checkpointing; retrying with it on")
    set_gradient_checkpointing(parts.model, True)
    try:
        return step(parts, group, t, number, pad_id)
    except torch.OutOfMemoryError as e:
        raise OutOfMemory(number, e) from None
