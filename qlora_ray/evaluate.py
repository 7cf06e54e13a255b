"""Evaluation: perplexity on the eval set's target tokens, sample replies, samples.md.

The token loss itself is ``qlora_ray.loss``. Perplexity is ``exp(sum of token losses / number of target tokens)`` over exactly the same
tokens for the base model and every trial (``data.eval_batches`` is fixed and unpacked), so the
numbers compare. It is a token-weighted mean, not a mean of per-batch means.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple

import torch

from qlora_ray.loss import autocast, to_device, token_loss
from qlora_ray.records import Baseline
from qlora_ray.spec import EvalSpec, JobSpec


# ---------------------------------------------------------------- perplexity

@torch.no_grad()
def perplexity(model, batches: Iterable[dict], dtype: Optional[torch.dtype] = None,
               advance: Optional[Callable[[int], None]] = None) -> Tuple[float, int]:
    """``(exp(summed loss / target tokens), target tokens)`` over ``batches`` (computed in ``dtype``,
    the model's compute dtype; None: as the weights are); the model is left as it was.
    ``advance(target tokens)`` is called after each batch (a progress bar)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for batch in batches:
            loss, count = token_loss(model, batch, dtype)
            total += float(loss)
            tokens += count
            if advance is not None:
                advance(count)
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


def decoding_settings(spec: EvalSpec) -> dict:
    """The settings that decide a reply to a prompt (part of the base figures' cache key)."""
    settings = {"max_new_tokens": spec.max_new_tokens, "temperature": spec.temperature,
                "repetition_penalty": spec.repetition_penalty, "no_repeat_ngram_size": spec.no_repeat_ngram_size}
    if spec.temperature > 0:
        settings.update(top_p=spec.top_p, seed=spec.seed)
    return settings


def describe_decoding(spec: EvalSpec) -> str:
    """The decoding settings in words, for the top of samples.md."""
    how = (f"sampled (temperature {spec.temperature:g}, top_p {spec.top_p:g}, seed {spec.seed})"
           if spec.temperature > 0 else "greedy (temperature 0)")
    return (f"Decoding: {how}, repetition_penalty {spec.repetition_penalty:g}, no_repeat_ngram_size "
            f"{spec.no_repeat_ngram_size}, max_new_tokens {spec.max_new_tokens}; the same prompts and "
            "settings for the base and the tuned model.")


def _generate_kwargs(spec: EvalSpec, model, tokenizer) -> dict:
    sampling = spec.temperature > 0
    return dict(max_new_tokens=spec.max_new_tokens, do_sample=sampling, num_beams=1,
                temperature=spec.temperature if sampling else None, top_p=spec.top_p if sampling else None,
                top_k=None, repetition_penalty=spec.repetition_penalty,
                no_repeat_ngram_size=spec.no_repeat_ngram_size, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=_stop_ids(model, tokenizer), use_cache=True)


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: List[str], spec: EvalSpec,
                     dtype: Optional[torch.dtype] = None) -> List[str]:
    """Replies to single-turn user ``prompts`` through the chat template, decoded as ``spec`` says,
    batched ``spec.batch_size`` at a time (left padding) with the KV cache. Sampling is seeded by
    ``spec.seed`` per batch, so base and tuned replies draw alike and a re-run repeats them."""
    from qlora_ray.model import device_of

    if not prompts:
        return []
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    replies: List[str] = []
    kwargs = _generate_kwargs(spec, model, tokenizer)
    try:
        for start in range(0, len(prompts), spec.batch_size):
            chunk = prompts[start:start + spec.batch_size]
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = to_device(dict(enc), device_of(model))
            if spec.temperature > 0:
                torch.manual_seed(spec.seed + start)
            with autocast(model, dtype):
                out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1]:]
            replies += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


def ngram_repeats(text: str, n: int = 3) -> int:
    """How often the most frequent run of ``n`` words occurs in ``text`` (words: lower-cased, with
    punctuation stripped), 0 when the text has fewer than ``n`` words. A looping reply such as
    "kabir, kabir, kabir, kabir" scores high; readable text scores 1 or 2."""
    words = [w for w in (re.sub(r"[^\w']+", "", t.lower()) for t in text.split()) if w]
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return max(counts.values(), default=0)


def _stop_ids(model, tokenizer) -> List[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def chat_reply(model, tokenizer, messages: List[dict], spec: EvalSpec,
               dtype: Optional[torch.dtype] = None) -> str:
    """One assistant reply to a conversation (list of {role, content}), decoded as ``spec`` says."""
    from qlora_ray.model import device_of

    model.eval()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = to_device(dict(tokenizer(text, return_tensors="pt", add_special_tokens=False)), device_of(model))
    if spec.temperature > 0:
        torch.manual_seed(spec.seed)
    with torch.no_grad(), autocast(model, dtype):
        out = model.generate(**enc, **_generate_kwargs(spec, model, tokenizer))
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# ---------------------------------------------------------------- the base model, once

def measure(model, tokenizer, prepared, spec: JobSpec, dtype: Optional[torch.dtype] = None) -> Baseline:
    """Perplexity (if ``eval.perplexity``) and replies to the prompts for an already loaded model
    computing in ``dtype``."""
    from qlora_ray import data

    ppl, tokens = None, 0
    if spec.eval.perplexity and prepared.eval:
        ppl, tokens = perplexity(model, data.eval_batches(prepared, spec.eval.batch_size), dtype)
    prompts = read_prompts(spec.eval)
    replies = generate_replies(model, tokenizer, prompts, spec.eval, dtype)
    return Baseline(perplexity=ppl, target_tokens=tokens, replies=replies, prompts=prompts)


def baseline(spec: JobSpec) -> Baseline:
    """The figures of the (quantized) base model of ``spec`` on the spec's eval set and prompts:
    from the base-figure cache, else the model is loaded and measured (and the figures cached)."""
    from qlora_ray import data
    from qlora_ray.base_cache import base_key, cached
    from qlora_ray.model import load_base, load_tokenizer, pick_device

    tokenizer = load_tokenizer(spec.model, spec.data.cache_dir)
    prepared = data.prepare(spec.data, tokenizer)

    def measure_now() -> Baseline:
        torch.manual_seed(spec.train.seed)
        model, tokenizer, dtype, _ = load_base(spec)
        return measure(model, tokenizer, prepared, spec, dtype)

    return cached(base_key(spec, tokenizer, prepared, pick_device(spec.resources)), measure_now)


# ---------------------------------------------------------------- samples.md

def _cell(text: str) -> str:
    return (text or "(empty)").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def write_samples(path, prompts: List[str], base_replies: List[str], tuned_replies: List[str],
                  decoding: str = "") -> Path:
    """A markdown table: each prompt with the base model's and the tuned model's reply side by side,
    under ``decoding`` (``describe_decoding``: how both were generated)."""
    path = Path(path)
    lines = ["# Sample replies: base vs tuned", "",
             decoding or "The same prompts and decoding settings for both models.", "",
             "| # | prompt | base | tuned |", "| --- | --- | --- | --- |"]
    for i, prompt in enumerate(prompts):
        base = base_replies[i] if i < len(base_replies) else ""
        tuned = tuned_replies[i] if i < len(tuned_replies) else ""
        lines.append(f"| {i + 1} | {_cell(prompt)} | {_cell(base)} | {_cell(tuned)} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
