"""Fused QLoRA training path for peft-wrapped Llama-style models.

``handle = fuse(model)`` swaps, at training time, the per-module peft path on 4-bit linears for
fused autograd functions (see ``lora.py``): q/k/v as one stacked projection over one input,
o, gate/up + SwiGLU + down as one function; NF4 weights dequantized and multiplied in the
compute dtype; LoRA factors cast once per forward from their fp32 masters; no activation ever
cast to fp32 on its way into a projection; no dropout work at p = 0. Parameters and module
names stay peft's, so adapters save and load as standard peft. ``handle.unfuse()`` (or leaving
``with fuse(model):``) restores the model's own forwards.

Runs wherever the model runs: CUDA fp16 (with a gradient scaler) or bf16, and the CPU in fp32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from qlora_ray.kernels.elementwise import Elementwise
from qlora_ray.kernels.lora import Context
from qlora_ray.kernels.offload import Copier, offloaded_checkpoint
from qlora_ray.kernels.patch import patch_model, unpatch
from qlora_ray.kernels.weights import LoraCache

__all__ = ["FusedHandle", "fuse"]
log = logging.getLogger(__name__)


@dataclass
class FusedHandle:
    """What ``fuse`` changed, to undo it; ``layers`` counts the fused attention and MLP modules."""

    model: torch.nn.Module
    context: Context
    modules: List[torch.nn.Module] = field(default_factory=list)
    attention: int = 0
    mlp: int = 0
    offloaded: int = 0
    _hook: Optional[object] = None
    _checkpoint_funcs: list = field(default_factory=list)

    @property
    def compiled(self) -> bool:
        return self.context.ops.compiled

    def unfuse(self) -> None:
        """Restore the model's own forwards (idempotent)."""
        unpatch(self.modules)
        self.modules = []
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for layer, func in self._checkpoint_funcs:
            layer._gradient_checkpointing_func = func
        self._checkpoint_funcs = []
        self.context.cache.clear()

    def __enter__(self) -> "FusedHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.unfuse()


def fuse(model, compute_dtype: Optional[torch.dtype] = None, compile: bool = False,
         offload: bool = False) -> FusedHandle:
    """Patch ``model`` (a peft model over a Llama-style causal LM) for fused training.

    ``compute_dtype`` defaults to the model's (``qlora_compute_dtype`` as set by
    ``qlora_ray.model.load_base``, else the 4-bit layers' compute dtype, else fp32).
    ``compile`` runs SwiGLU's backward and RMSNorm through ``torch.compile`` on CUDA (Triton,
    which builds for sm75 too), falling back to plain PyTorch where that fails; off by default
    until its compile time is measured against its gain. ``offload`` keeps the
    checkpointed layer inputs in host memory (needs gradient checkpointing on).
    """
    dtype = compute_dtype or _compute_dtype(model)
    device = next(model.parameters()).device
    context = Context(dtype=dtype, cache=LoraCache(), ops=Elementwise(compile and device.type == "cuda"))
    handle = FusedHandle(model=model, context=context)
    handle.modules = patch_model(model, context)
    handle.attention = sum(1 for m in handle.modules if hasattr(m, "q_proj"))
    handle.mlp = sum(1 for m in handle.modules if hasattr(m, "gate_proj"))
    if not handle.attention and not handle.mlp:
        unpatch(handle.modules)
        raise ValueError("fuse: no peft LoRA attention or MLP module found that the fused path supports "
                         "(Llama-style q/k/v/o and SwiGLU gate/up/down, one 'default' adapter)")
    # Every top-level decoder call casts the LoRA factors afresh (the optimizer stepped since).
    decoder = _decoder(model)
    handle._hook = decoder.register_forward_pre_hook(lambda module, args: context.cache.clear())
    if offload:
        from transformers.modeling_layers import GradientCheckpointingLayer

        copier = Copier()
        for layer in decoder.modules():
            if isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing:
                handle._checkpoint_funcs.append((layer, layer._gradient_checkpointing_func))
                layer._gradient_checkpointing_func = offloaded_checkpoint(copier)
        handle.offloaded = len(handle._checkpoint_funcs)
    log.info("fused %d attention and %d MLP modules (%s, compiled: %s, offloaded layers: %d)",
             handle.attention, handle.mlp, dtype, handle.compiled, handle.offloaded)
    return handle


def _compute_dtype(model) -> torch.dtype:
    dtype = getattr(model, "qlora_compute_dtype", None)
    if dtype is not None:
        return dtype
    for module in model.modules():
        found = getattr(module, "compute_dtype", None)
        if isinstance(found, torch.dtype):
            return found
    return torch.float32


def _decoder(model) -> torch.nn.Module:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(inner, "get_decoder", None)
    return get_decoder() if get_decoder is not None else inner
