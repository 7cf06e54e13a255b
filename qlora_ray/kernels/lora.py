"""Fused QLoRA autograd functions: a stacked projection group, and the SwiGLU MLP.

For a group of projections sharing input ``x`` (N, in) with stacked base weight ``W``, stacked
LoRA ``A`` (R, in) and block-diagonal scaled ``B`` (out, R)::

    xa = dropout(x) A^T            y = x W^T + xa B^T
    dxa = dy B                     dB_i = s_i dy_i^T xa_i     dA = dxa^T dropout(x)
    dx = dy W + dropout'(dxa A)

Everything runs in the compute dtype: the activations are never cast to fp32, the base weight
is dequantized into one buffer for the forward and again for the backward (never kept; a plain
base weight is read as it is, a plain stacked group is stacked once), and the
LoRA factors come from :class:`LoraCache`. Gradients of the fp32 LoRA masters are returned in
fp32. Dropout draws one mask per projection in peft's call order, and at p = 0 draws none, so
the stacked ``A`` costs one multiply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from qlora_ray.kernels.elementwise import Elementwise, dropout_mask, swiglu
from qlora_ray.kernels.weights import Group, LoraCache


@dataclass
class Context:
    """What every fused call of one model shares."""

    dtype: torch.dtype
    cache: LoraCache
    ops: Elementwise


def _masks(x: torch.Tensor, group: Group, training: bool) -> Optional[List[Optional[torch.Tensor]]]:
    if not training or not any(p > 0 for p in group.dropouts):
        return None
    return [dropout_mask(x, p) if p > 0 else None for p in group.dropouts]


def group_forward(x: torch.Tensor, group: Group, ctx: Context, masks) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, xa)`` for the 2D input ``x``; see the module docstring."""
    weight = group.base_weight(ctx.dtype, x.device)
    a, b, parts = ctx.cache.get(group, ctx.dtype)
    bias = group.bias(ctx.dtype)
    y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    del weight
    if masks is None:
        xa = x @ a.t()
    else:
        xa = torch.cat([(x if m is None else x * m) @ part.t() for m, part in zip(masks, parts)], dim=1)
    y.addmm_(xa, b.t())
    return y, xa


def group_backward(dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, group: Group, ctx: Context,
                   masks) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``(dx, [dA_1, dB_1, dA_2, ...])`` with the LoRA gradients in fp32."""
    a, b, parts = ctx.cache.get(group, ctx.dtype)
    dxa = dy @ b
    grads: List[torch.Tensor] = []
    if masks is None:
        d_a = (dxa.t() @ x).float().split(group.ranks)
    row = col = 0
    for i, (p, width, rank) in enumerate(zip(group.projections, group.widths, group.ranks)):
        dxa_i = dxa[:, col:col + rank]
        if masks is None:
            grad_a = d_a[i]
        else:
            xd = x if masks[i] is None else x * masks[i]
            grad_a = (dxa_i.t() @ xd).float()
        grad_b = (dy[:, row:row + width].t() @ xa[:, col:col + rank]).float().mul_(p.scaling)
        grads += [grad_a, grad_b]
        row, col = row + width, col + rank
    weight = group.base_weight(ctx.dtype, dy.device)
    dx = dy @ weight
    del weight
    if masks is None:
        dx.addmm_(dxa, a)
    else:
        for m, part, dxa_i in zip(masks, parts, dxa.split(group.ranks, dim=1)):
            dx.add_(dxa_i @ part if m is None else (dxa_i @ part) * m)
    return dx, grads


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


class GroupLinear(torch.autograd.Function):
    """``y = x W^T + LoRA(x)`` for a projection group; ``x`` is (..., in), ``y`` (..., sum of outs)."""

    @staticmethod
    def forward(fctx, x: torch.Tensor, group: Group, ctx: Context, training: bool, *masters):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(ctx.dtype)
        with _no_autocast(x.device):
            masks = _masks(x2, group, training)
            y, xa = group_forward(x2, group, ctx, masks)
        fctx.save_for_backward(x2, xa, *(masks or ()))
        fctx.group, fctx.ctx, fctx.has_masks, fctx.in_dtype = group, ctx, masks is not None, x.dtype
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(fctx, dy):
        x2, xa, *masks = fctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).to(fctx.ctx.dtype)
        with _no_autocast(dy.device):
            dx, grads = group_backward(dy2, x2, xa, fctx.group, fctx.ctx, masks if fctx.has_masks else None)
        dx = dx.view(*dy.shape[:-1], dx.shape[-1]).to(fctx.in_dtype)
        return (dx, None, None, None, *grads)


class SwiGLUMLP(torch.autograd.Function):
    """``down(silu(gate(x)) * up(x))`` with LoRA on all three; gate and up as one group."""

    @staticmethod
    def forward(fctx, x: torch.Tensor, gate_up: Group, down: Group, ctx: Context, training: bool, *masters):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(ctx.dtype)
        with _no_autocast(x.device):
            masks_gu = _masks(x2, gate_up, training)
            gu, xa_gu = group_forward(x2, gate_up, ctx, masks_gu)
            g, u = gu.split(gate_up.widths, dim=1)
            h = swiglu(g, u)
            masks_d = _masks(h, down, training)
            out, xa_d = group_forward(h, down, ctx, masks_d)
        del h
        fctx.save_for_backward(x2, gu, xa_gu, xa_d, *(masks_gu or ()), *(masks_d or ()))
        fctx.groups, fctx.ctx, fctx.in_dtype = (gate_up, down), ctx, x.dtype
        fctx.n_masks = (len(masks_gu) if masks_gu else 0, len(masks_d) if masks_d else 0)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(fctx, dout):
        x2, gu, xa_gu, xa_d, *masks = fctx.saved_tensors
        gate_up, down = fctx.groups
        n_gu, n_d = fctx.n_masks
        masks_gu, masks_d = masks[:n_gu] or None, masks[n_gu:n_gu + n_d] or None
        ctx = fctx.ctx
        d2 = dout.reshape(-1, dout.shape[-1]).to(ctx.dtype)
        with _no_autocast(dout.device):
            g, u = gu.split(gate_up.widths, dim=1)
            h = swiglu(g, u)
            dh, grads_d = group_backward(d2, h, xa_d, down, ctx, masks_d)
            del h
            dgu = ctx.ops.swiglu_backward(dh, g, u)
            del dh
            dx, grads_gu = group_backward(dgu, x2, xa_gu, gate_up, ctx, masks_gu)
        dx = dx.view(*dout.shape[:-1], dx.shape[-1]).to(fctx.in_dtype)
        return (dx, None, None, None, None, *grads_gu, *grads_d)
