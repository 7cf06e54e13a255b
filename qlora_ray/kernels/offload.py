"""Activation checkpointing that keeps each decoder layer's input in host memory.

Plain checkpointing keeps one hidden-state tensor per layer on the GPU; this keeps it in pinned
host memory instead (copied on a side stream while the next layers compute) and brings it back
for the layer's recomputation in backward. For GPUs where those tensors are what stops a
larger step from fitting (a T4's 15 GiB); on a large GPU the copies only cost time.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


class _Offloaded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: Callable, hidden: torch.Tensor, copier: "Copier", *rest):
        ctx.rng = _rng_state(hidden.device)  # before the forward draws its dropout masks
        with torch.no_grad():
            out = run(hidden, *rest)
        ctx.run, ctx.rest, ctx.device = run, rest, hidden.device
        ctx.host = copier.to_host(hidden)
        ctx.autocast = _autocast_state(hidden.device)
        ctx.copier = copier
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden = ctx.copier.to_device(ctx.host, ctx.device).requires_grad_(True)
        ctx.host = None
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            _set_rng_state(ctx.rng, ctx.device)
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                out = ctx.run(hidden, *ctx.rest)
        torch.autograd.backward(out, grad)
        return (None, hidden.grad, None) + (None,) * len(ctx.rest)


class Copier:
    """Host copies on a side stream, so they overlap the next layers' compute."""

    def __init__(self):
        self.stream: Optional[torch.cuda.Stream] = None

    def to_host(self, t: torch.Tensor):
        if t.device.type != "cuda":
            return t.detach().clone()
        if self.stream is None:
            self.stream = torch.cuda.Stream(t.device)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t.detach(), non_blocking=True)
        t.record_stream(self.stream)  # the caching allocator must not reuse t before the copy ends
        return host

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device.type != "cuda":
            return host
        if self.stream is not None:
            torch.cuda.current_stream(device).wait_stream(self.stream)
        return host.to(device, non_blocking=True)


def offloaded_checkpoint(copier: Copier) -> Callable:
    """A ``_gradient_checkpointing_func`` for transformers' checkpointed layers."""

    def checkpoint(run: Callable, hidden: torch.Tensor, *rest):
        return _Offloaded.apply(run, hidden, copier, *rest)

    return checkpoint


def _autocast_state(device: torch.device) -> dict:
    kind = device.type
    return {"device_type": kind, "enabled": torch.is_autocast_enabled(kind),
            "dtype": torch.get_autocast_dtype(kind)}


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
