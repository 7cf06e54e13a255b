"""Elementwise pieces of a decoder block (SwiGLU, RMSNorm, dropout masks), plain PyTorch.

On CUDA, ``Elementwise(compile=True)`` runs SwiGLU's backward and RMSNorm through
``torch.compile`` (Inductor's Triton kernels, which also build for a T4's sm75): each becomes
one or two fused kernels that keep fp32 intermediates in registers instead of memory. The
plain functions are the reference and what runs on the CPU or where compiling fails.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A dropout multiplier shaped like ``x``: 0 with probability ``p``, else ``1 / (1 - p)``."""
    return torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u``."""
    return F.silu(g) * u


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Gradients of ``silu(g) * u`` for ``g`` and ``u``, side by side: ``(N, 2I)``."""
    out = torch.empty(g.shape[0], g.shape[1] * 2, dtype=dh.dtype, device=dh.device)
    width = g.shape[1]
    torch.ops.aten.silu_backward.grad_input(dh * u, g, grad_input=out[:, :width])
    torch.mul(dh, F.silu(g), out=out[:, width:])
    return out


def _swiglu_backward_fp32(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    gf, uf, dhf = g.float(), u.float(), dh.float()
    sig = torch.sigmoid(gf)
    dg = dhf * uf * sig * (1.0 + gf * (1.0 - sig))
    return torch.cat([dg, dhf * gf * sig], dim=1).to(dh.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Llama's RMSNorm computed in fp32 (as transformers does), returned in ``dtype``."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h).to(dtype)


class Elementwise:
    """The elementwise functions the fused path calls, compiled or plain."""

    def __init__(self, compile: bool):
        self.compiled = False
        self.swiglu_backward: Callable = swiglu_backward
        self.rms_norm: Callable = rms_norm
        if compile:
            self._try_compile()

    def _try_compile(self) -> None:
        try:
            bwd = torch.compile(_swiglu_backward_fp32, dynamic=True)
            norm = torch.compile(rms_norm, dynamic=True)
            # Compile failures surface at the first call: find them now, not mid-step.
            x = torch.randn(8, 16, device="cuda", dtype=torch.float16)
            bwd(x, x, x)
            w = torch.ones(16, device="cuda", requires_grad=False)
            norm(x.float().requires_grad_(), w, 1e-5, torch.float16).sum().backward()
        except Exception as e:  # no Triton, no compiler, an unsupported GPU: the plain path
            log.warning("torch.compile unavailable for the fused path (%s); using plain PyTorch", e)
            return
        self.swiglu_backward, self.rms_norm, self.compiled = bwd, norm, True
