"""The optimizer, the learning-rate schedule and the fp16 gradient scaler of a trial."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from qlora_ray.errors import UserError
from qlora_ray.spec import TrainSpec


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
    """``lr_factor`` as a LambdaLR over ``total`` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t, total))


def build_scaler(device, compute_dtype: torch.dtype) -> Optional[torch.amp.GradScaler]:
    """A loss scaler for fp16 on CUDA (bf16 and fp32 need none)."""
    if device.type == "cuda" and compute_dtype == torch.float16:
        return torch.amp.GradScaler("cuda")
    return None


@dataclass
class TrainParts:
    """What an optimizer step touches and a checkpoint saves: the model, its trainable
    parameters, the optimizer, the schedule, the fp16 scaler, and the dtype it computes in."""

    model: Any
    params: List[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    compute_dtype: torch.dtype


def build_parts(model, t: TrainSpec, total: int, compute_dtype: torch.dtype) -> TrainParts:
    """Optimizer, schedule over ``total`` steps and scaler for the trainable parameters of ``model``."""
    from qlora_ray.model import device_of

    device = device_of(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(t, params, device)
    return TrainParts(model=model, params=params, optimizer=optimizer, scheduler=build_scheduler(optimizer, t, total),
                      scaler=build_scaler(device, compute_dtype), compute_dtype=compute_dtype)
