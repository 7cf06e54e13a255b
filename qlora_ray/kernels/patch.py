"""Swap the forward of a peft-wrapped Llama-style model's attention, MLP and RMSNorm modules for
the fused path, and back. Only forwards change: every module and parameter stays where peft put
it, so the adapter saves, loads and merges as standard peft.

A swapped forward falls back to the original whenever the fused path would compute something
else: a KV cache (generation), adapters switched off or merged (base-model evaluation through
``disable_adapter``), another active adapter, DoRA.
"""

from __future__ import annotations

import sys
import types
from typing import Callable, List

import torch

from qlora_ray.kernels.lora import Context, GroupLinear, SwiGLUMLP
from qlora_ray.kernels.weights import Group, Projection, fusable

# Norms computed as ``weight * normalized`` (Gemma's ``1 + weight`` is not one of them).
LLAMA_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}
_CACHE_KEYS = ("cache", "past_key_values", "past_key_value", "layer_past")


def fusable_attention(module) -> bool:
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    return (all(fusable(getattr(module, n, None)) for n in names) and hasattr(module, "head_dim")
            and hasattr(module, "scaling") and not hasattr(module, "q_norm")
            and getattr(getattr(module, "config", None), "_attn_implementation", None) is not None)


def fusable_mlp(module) -> bool:
    names = ("gate_proj", "up_proj", "down_proj")
    act = getattr(module, "act_fn", None)
    return (all(fusable(getattr(module, n, None)) for n in names)
            and (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"))


def patch_attention(module, ctx: Context) -> None:
    """Give ``module`` (a Llama-style attention) the fused q/k/v and o forward."""
    qkv = Group([Projection(module.q_proj), Projection(module.k_proj), Projection(module.v_proj)])
    o = Group([Projection(module.o_proj)])
    source = sys.modules[type(module).__module__]
    rope: Callable = source.apply_rotary_pos_emb
    eager = getattr(source, "eager_attention_forward", None)
    original = module.forward

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        if any(kwargs.get(k) is not None for k in _CACHE_KEYS) or not (qkv.plain() and o.plain()):
            return original(hidden_states, position_embeddings=position_embeddings,
                            attention_mask=attention_mask, **kwargs)
        for key in _CACHE_KEYS:
            kwargs.pop(key, None)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        batch, length = hidden_states.shape[:2]
        mixed = GroupLinear.apply(hidden_states, qkv, ctx, self.training, *qkv.masters())
        q, k, v = (t.view(batch, length, -1, self.head_dim).transpose(1, 2) for t in mixed.split(qkv.widths, dim=-1))
        cos, sin = position_embeddings
        q, k = rope(q, k, cos.to(ctx.dtype), sin.to(ctx.dtype))
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
        out, _ = attend(self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                        scaling=self.scaling, **kwargs)
        out = out.reshape(batch, length, -1)
        return GroupLinear.apply(out, o, ctx, self.training, *o.masters()), None

    module.forward = types.MethodType(forward, module)


def patch_mlp(module, ctx: Context) -> None:
    """Give ``module`` (a SwiGLU MLP) the fused gate/up + SwiGLU + down forward."""
    gate_up = Group([Projection(module.gate_proj), Projection(module.up_proj)])
    down = Group([Projection(module.down_proj)])
    original = module.forward

    def forward(self, x):
        if not (gate_up.plain() and down.plain()):
            return original(x)
        return SwiGLUMLP.apply(x, gate_up, down, ctx, self.training, *gate_up.masters(), *down.masters())

    module.forward = types.MethodType(forward, module)


def patch_norm(module, ctx: Context) -> None:
    """RMSNorm that hands the next projection the compute dtype (not fp32 from fp32 weights)."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))

    def forward(self, hidden_states):
        return ctx.ops.rms_norm(hidden_states, self.weight, eps, ctx.dtype)

    module.forward = types.MethodType(forward, module)


def patch_model(model, ctx: Context) -> List[torch.nn.Module]:
    """Patch every fusable module of ``model``; returns the patched modules."""
    patched = []
    for module in model.modules():
        if fusable_attention(module):
            patch_attention(module, ctx)
        elif fusable_mlp(module):
            patch_mlp(module, ctx)
        elif type(module).__name__ in LLAMA_NORMS:
            patch_norm(module, ctx)
        else:
            continue
        patched.append(module)
    return patched


def unpatch(modules: List[torch.nn.Module]) -> None:
    """Restore the class forward of every module ``patch_model`` changed."""
    for module in modules:
        module.__dict__.pop("forward", None)
