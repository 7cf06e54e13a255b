"""The weights a fused projection group reads: 4-bit base weights dequantized straight into one
buffer in the compute dtype, and LoRA factors cast from their fp32 masters once per forward.

A group is the projections of one layer that share an input (q/k/v, gate/up) or a single one
(o, down). Its base weights are stacked along the output dimension, so the group costs one
matrix multiply; its LoRA A factors are stacked too (one multiply for all ranks), and its B
factors form a block-diagonal matrix with each projection's scaling folded in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

ADAPTER = "default"


@dataclass
class Projection:
    """One peft LoRA layer over a (4-bit or plain) linear base, as the fused path reads it."""

    module: torch.nn.Module  # the peft LoraLayer (its parameters keep their peft names)
    adapter: str = ADAPTER

    @property
    def base(self) -> torch.nn.Module:
        return self.module.base_layer

    @property
    def lora_a(self) -> torch.nn.Parameter:
        return self.module.lora_A[self.adapter].weight

    @property
    def lora_b(self) -> torch.nn.Parameter:
        return self.module.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter])

    @property
    def dropout(self) -> float:
        layer = self.module.lora_dropout[self.adapter]
        return float(getattr(layer, "p", 0.0))

    @property
    def out_features(self) -> int:
        return self.lora_b.shape[0]

    @property
    def in_features(self) -> int:
        return self.lora_a.shape[1]

    def plain(self) -> bool:
        """Whether the fused path computes exactly what peft would now: one active vanilla
        LoRA adapter, not merged, not switched off."""
        m = self.module
        return (not getattr(m, "disable_adapters", False) and not getattr(m, "merged", False)
                and list(getattr(m, "active_adapters", [self.adapter])) == [self.adapter]
                and self.adapter not in getattr(m, "lora_variant", {})
                and not getattr(m, "use_dora", {}).get(self.adapter, False))


def fusable(module) -> bool:
    """A peft LoRA layer with one ``default`` adapter over a 4-bit or plain linear base."""
    lora_a = getattr(module, "lora_A", None)
    base = getattr(module, "base_layer", None)
    if lora_a is None or base is None or list(lora_a.keys()) != [ADAPTER]:
        return False
    weight = getattr(base, "weight", None)
    return weight is not None and (hasattr(weight, "quant_state") or weight.dim() == 2)


def dequantize_into(base: torch.nn.Module, out: torch.Tensor) -> None:
    """Write ``base``'s weight (out, in) into ``out`` in ``out``'s dtype: NF4/FP4 through
    bitsandbytes, a plain weight by a copy."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        out.copy_(weight)
        return
    from bitsandbytes.functional import dequantize_4bit

    if state.dtype == out.dtype and _DIRECT.get(out.device.type, True):
        try:
            dequantize_4bit(weight.data, state, out=out)
            return
        except NotImplementedError:  # no out= kernel on this backend (bitsandbytes' CPU one)
            _DIRECT[out.device.type] = False
    out.copy_(dequantize_4bit(weight.data, state))


# Whether bitsandbytes dequantizes into a given buffer on a device type (learned at first use).
_DIRECT: Dict[str, bool] = {}


class Group:
    """Projections sharing one input, computed as one stacked projection."""

    def __init__(self, projections: List[Projection]):
        self.projections = projections
        self.widths = [p.out_features for p in projections]
        self.ranks = [p.lora_a.shape[0] for p in projections]
        self.in_features = projections[0].in_features
        self.dropouts = [p.dropout for p in projections]
        self.biases = [getattr(p.base, "bias", None) for p in projections]
        self._stacked: Optional[torch.Tensor] = None  # plain base weights, stacked once

    @property
    def out_features(self) -> int:
        return sum(self.widths)

    def masters(self) -> Tuple[torch.Tensor, ...]:
        """The fp32 LoRA parameters, A then B per projection: the autograd inputs."""
        return tuple(t for p in self.projections for t in (p.lora_a, p.lora_b))

    def plain(self) -> bool:
        return all(p.plain() for p in self.projections)

    def base_weight(self, dtype: torch.dtype, device) -> torch.Tensor:
        """All base weights stacked, (sum of outs, in), in ``dtype``: 4-bit ones freshly
        dequantized; plain ones (an unquantized base, or a 4-bit one kept dequantized on the CPU)
        used as they are, or stacked once and kept, since the base is frozen. Read only."""
        plain = [p.base.weight for p in self.projections]
        if all(getattr(w, "quant_state", None) is None and w.dtype == dtype for w in plain):
            if len(plain) == 1:
                return plain[0]
            if self._stacked is None:
                self._stacked = torch.cat([w.detach() for w in plain])
            return self._stacked
        out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=device)
        row = 0
        for p, width in zip(self.projections, self.widths):
            dequantize_into(p.base, out[row:row + width])
            row += width
        return out

    def bias(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        if all(b is None for b in self.biases):
            return None
        parts = [b.to(dtype) if b is not None else torch.zeros(w, dtype=dtype, device=self.projections[0].lora_a.device)
                 for b, w in zip(self.biases, self.widths)]
        return torch.cat(parts)


class LoraCache:
    """Compute-dtype copies of the LoRA factors, made once and reused until ``clear``.

    The fused path clears it at every top-level decoder call: within one forward, its
    recomputation under activation checkpointing and its backward, the factors are cast once.
    Optimizers that write parameters in place outside autograd (bitsandbytes' 8-bit AdamW)
    leave no version bump behind, so the cache is cleared by call, never by version.
    """

    def __init__(self):
        self._entries: Dict[Tuple[int, torch.dtype], Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]] = {}

    def clear(self) -> None:
        self._entries.clear()

    def get(self, group: Group, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """``(A stacked (sum r, in), B block-diagonal with scaling (sum out, sum r), [A_i])`` in ``dtype``."""
        key = (id(group), dtype)
        hit = self._entries.get(key)
        if hit is None:
            hit = self._entries[key] = _cast(group, dtype)
        return hit


def _cast(group: Group, dtype: torch.dtype):
    with torch.no_grad():
        a = torch.cat([p.lora_a for p in group.projections]).to(dtype)
        b = a.new_zeros(group.out_features, sum(group.ranks))
        row = col = 0
        for p, width, rank in zip(group.projections, group.widths, group.ranks):
            b[row:row + width, col:col + rank] = p.lora_b * p.scaling
            row, col = row + width, col + rank
        parts = list(a.split(group.ranks))
    return a, b, parts
