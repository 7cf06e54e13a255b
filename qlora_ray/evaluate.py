"""Evaluation: perplexity on the eval set's target tokens, greedy sample replies, samples.md.

Perplexity is ``exp(sum of token losses / number of target tokens)`` over exactly the same
tokens for the base model and every trial (``data.eval_batches`` is fixed and unpacked), so the
numbers compare. It is a token-weighted mean, not a mean of per-batch means.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from qlora_ray.data import IGNORE
from qlora_ray.spec import EvalSpec, JobSpec


@dataclass
class Baseline:
    """The base model measured once per experiment: eval perplexity and replies to the prompts."""

    perplexity: Optional[float]
    target_tokens: int
    replies: List[str] = field(default_factory=list)
    prompts: List[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Baseline":
        raw = json.loads(text)
        return cls(perplexity=raw.get("perplexity"), target_tokens=int(raw.get("target_tokens") or 0),
                   replies=list(raw.get("replies") or []), prompts=list(raw.get("prompts") or []))


# ---------------------------------------------------------------- loss and perplexity

def autocast(model):
    """Mixed precision for a model whose compute dtype is half on CUDA; a no-op otherwise."""
    from qlora_ray.model import compute_dtype_of, device_of

    device, dtype = device_of(model), compute_dtype_of(model)
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# Target rows per cross-entropy chunk: one chunk's fp32 logits (2,048 x a 32k vocabulary = 256 MiB)
# is all that is ever alive, instead of the whole micro-batch's.
CE_CHUNK = 2048


def token_loss(model, batch: dict) -> Tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the batch's target tokens, and how many there are.

    Labels are unshifted (HF convention). The decoder runs on every position, but the output
    head and the fp32 cross-entropy only on target positions (prompt and padding never cost a
    vocabulary-wide row), in chunks of ``CE_CHUNK`` rows that are recomputed in backward rather
    than kept, so the full fp32 logits of a micro-batch never exist.
    """
    from qlora_ray.model import device_of

    batch = to_device(batch, device_of(model))
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    count = int(mask.sum())
    decoder, head = _decoder_and_head(model)
    with autocast(model):
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


@torch.no_grad()
def perplexity(model, batches: Iterable[dict]) -> Tuple[float, int]:
    """``(exp(summed loss / target tokens), target tokens)`` over ``batches``; the model is left as it was."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for batch in batches:
            loss, count = token_loss(model, batch)
            total += float(loss)
            tokens += count
    finally:
        model.train(was_training)
    if tokens == 0:
        return float("nan"), 0
    return math.exp(total / tokens), tokens


# ---------------------------------------------------------------- replies

def read_prompts(spec: EvalSpec) -> List[str]:
    """The prompts file's non-empty lines, at most ``max_prompts``."""
    if not spec.prompts:
        return []
    lines = [line.strip() for line in Path(spec.prompts).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line]
    return prompts[: spec.max_prompts] if spec.max_prompts else prompts


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: List[str], max_new_tokens: int,
                     batch_size: int = 8) -> List[str]:
    """Greedy replies to single-turn user ``prompts`` through the chat template, batched (left padding)."""
    from qlora_ray.model import device_of

    if not prompts:
        return []
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    replies: List[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = to_device(dict(enc), device_of(model))
            with autocast(model):
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     num_beams=1, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=_stop_ids(model, tokenizer), use_cache=True,
                                     temperature=None, top_p=None, top_k=None)
            new = out[:, enc["input_ids"].shape[1]:]
            replies += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


def _stop_ids(model, tokenizer) -> List[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def chat_reply(model, tokenizer, messages: List[dict], max_new_tokens: int) -> str:
    """One greedy assistant reply to a conversation (list of {role, content})."""
    from qlora_ray.model import device_of

    model.eval()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = to_device(dict(tokenizer(text, return_tensors="pt", add_special_tokens=False)), device_of(model))
    with torch.no_grad(), autocast(model):
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=_stop_ids(model, tokenizer),
                             use_cache=True, temperature=None, top_p=None, top_k=None)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# ---------------------------------------------------------------- the base model, once

def measure(model, tokenizer, prepared, spec: JobSpec) -> Baseline:
    """Perplexity (if ``eval.perplexity``) and replies to the prompts for an already loaded model."""
    from qlora_ray import data

    ppl, tokens = None, 0
    if spec.eval.perplexity and prepared.eval:
        ppl, tokens = perplexity(model, data.eval_batches(prepared, spec.eval.batch_size))
    prompts = read_prompts(spec.eval)
    replies = generate_replies(model, tokenizer, prompts, spec.eval.max_new_tokens, spec.eval.batch_size)
    return Baseline(perplexity=ppl, target_tokens=tokens, replies=replies, prompts=prompts)


def baseline(spec: JobSpec) -> Baseline:
    """Load the (quantized) base model of ``spec`` and measure it on the spec's eval set and prompts."""
    from qlora_ray import data
    from qlora_ray.model import load_base

    torch.manual_seed(spec.train.seed)
    model, tokenizer = load_base(spec)
    prepared = data.prepare(spec.data, tokenizer)
    return measure(model, tokenizer, prepared, spec)


# ---------------------------------------------------------------- samples.md

def _cell(text: str) -> str:
    return (text or "(empty)").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def write_samples(path, prompts: List[str], base_replies: List[str], tuned_replies: List[str]) -> Path:
    """A markdown table: each prompt with the base model's and the tuned model's reply side by side."""
    path = Path(path)
    lines = ["# Sample replies: base vs tuned", "",
             "Greedy decoding, the same prompts and settings for both models.", "",
             "| # | prompt | base | tuned |", "| --- | --- | --- | --- |"]
    for i, prompt in enumerate(prompts):
        base = base_replies[i] if i < len(base_replies) else ""
        tuned = tuned_replies[i] if i < len(tuned_replies) else ""
        lines.append(f"| {i + 1} | {_cell(prompt)} | {_cell(base)} | {_cell(tuned)} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
