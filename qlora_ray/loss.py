"""The training loss: summed next-token cross-entropy over a batch's target tokens.

One function serves training (``train.step``) and evaluation (``evaluate.perplexity``), so the
eval perplexity is measured on exactly what training minimizes. Mixed precision follows the
compute dtype the model was loaded with (``model.LoadedModel.compute_dtype``), passed in.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from qlora_ray.data import IGNORE

# Target rows per cross-entropy chunk: one chunk's fp32 logits (2,048 x a 32k vocabulary = 256 MiB)
# is all that is ever alive, instead of the whole micro-batch's.
CE_CHUNK = 2048


def autocast(model, dtype: Optional[torch.dtype]):
    """Mixed precision for a model on CUDA computing in half precision; a no-op otherwise."""
    from qlora_ray.model import device_of

    if device_of(model).type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def token_loss(model, batch: dict, dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the batch's target tokens, and how many there are.

    Labels are unshifted (HF convention). The decoder runs on every position, but the output
    head and the fp32 cross-entropy only on target positions (prompt and padding never cost a
    vocabulary-wide row), in chunks of ``CE_CHUNK`` rows that are recomputed in backward rather
    than kept, so the full fp32 logits of a micro-batch never exist. ``dtype``: the model's
    compute dtype (None: no autocast).
    """
    from qlora_ray.model import device_of

    batch = to_device(batch, device_of(model))
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    count = int(mask.sum())
    decoder, head = _decoder_and_head(model)
    with autocast(model, dtype):
        if decoder is None:  # a model whose logits need more than the head (soft-capping, scaling)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                           position_ids=batch.get("position_ids"), use_cache=False).logits
            if count == 0:
                return logits.sum() * 0.0, 0
            return F.cross_entropy(logits[:, :-1][mask].float(), targets[mask], reduction="sum"), count
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                         position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
        if count == 0:
            return hidden.sum() * 0.0, 0
        return _chunked_ce(hidden[:, :-1][mask], targets[mask], head), count


def _chunked_ce(hidden: torch.Tensor, targets: torch.Tensor, head) -> torch.Tensor:
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(h, y):
        return F.cross_entropy(head(h).float(), y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], CE_CHUNK):
        h, y = hidden[i:i + CE_CHUNK], targets[i:i + CE_CHUNK]
        total = total + (checkpoint(chunk_loss, h, y, use_reentrant=False) if torch.is_grad_enabled()
                         else chunk_loss(h, y))
    return total


def _decoder_and_head(model):
    """The decoder stack and output head of a causal LM (peft-wrapped or not), or ``(None, None)``
    when its logits are more than ``head(hidden)`` (Gemma's soft-capping, Cohere's logit scale)."""
    from qlora_ray.model import unwrapped

    inner = unwrapped(model)
    config = getattr(inner, "config", None)
    if any(getattr(config, name, None) not in (None, 1.0) for name in ("final_logit_softcapping", "logit_scale")):
        return None, None
    get_decoder = getattr(inner, "get_decoder", None)
    decoder = get_decoder() if get_decoder else None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if decoder is None or head is None or decoder is inner:
        return None, None
    return decoder, head
