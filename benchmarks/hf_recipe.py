"""The plain Hugging Face QLoRA recipe, as a user would write it without qlora-ray.

bitsandbytes NF4 + double quant, peft LoRA on all linear layers, HF ``Trainer`` with per-batch
padding, gradient checkpointing, SDPA, paged 8-bit AdamW. This is the baseline the
throughput benchmark divides by; keep it what a careful user would write, not a straw man.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer,
                          TrainerCallback, TrainingArguments)


@dataclass
class RecipeResult:
    tokens_per_s: float
    peak_gib: float
    final_loss: float
    target_tokens: int
    steps: int
    eval_loss: Optional[float] = None


class _StepTimer(TrainerCallback):
    """Times each optimizer step with a device sync, so warmup steps can be left out."""

    def __init__(self):
        self.times: list[float] = []
        self.losses: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        self.times.append(time.perf_counter() - self._t)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_recipe(model_dir: str, tokenizer, rows: list[list[int]], batch_size: int, warmup_steps: int,
               compute_dtype=torch.float16, lora_r: int = 16, out_dir: str = "/tmp/hf_recipe",
               evaluate: Optional[Callable] = None, cpu: bool = False) -> RecipeResult:
    """Train one epoch over ``rows`` (token id lists, trained on every token) and time it;
    ``evaluate(model)`` gives the held-out loss afterwards. ``cpu`` only checks the harness."""
    if cpu:
        compute_dtype = torch.float32
    else:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=compute_dtype,
                                                 device_map={"": "cpu" if cpu else 0}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    dataset = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids} for ids in rows]
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch_size, num_train_epochs=1, learning_rate=2e-4,
        fp16=compute_dtype == torch.float16, bf16=compute_dtype == torch.bfloat16, optim="adamw_torch" if cpu else "paged_adamw_8bit", use_cpu=cpu,
        logging_steps=1, save_strategy="no", report_to=[], gradient_checkpointing=True,
        dataloader_num_workers=0, disable_tqdm=True, lr_scheduler_type="cosine",
        warmup_steps=max(1, round(0.03 * len(rows) / batch_size)),
        seed=42)
    timer = _StepTimer()
    pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    batch_tokens: list[int] = []

    def collate(features):
        # Trainer shuffles; count each batch's trained tokens (labels shift by one) as it is built.
        batch_tokens.append(sum(len(f["input_ids"]) - 1 for f in features))
        return pad(features)

    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
    trainer.add_callback(timer)
    trainer.train()
    tokens = sum(batch_tokens[warmup_steps:len(timer.times)])
    peak = torch.cuda.max_memory_allocated() / 2**30 if not cpu else float("nan")
    held_out = None
    if evaluate is not None:
        model.qlora_compute_dtype = compute_dtype  # what qlora-ray's perplexity autocasts to
        held_out = evaluate(model)
    result = RecipeResult(
        tokens_per_s=tokens / sum(timer.times[warmup_steps:]),
        peak_gib=peak, eval_loss=held_out,
        final_loss=sum(timer.losses[-5:]) / max(1, len(timer.losses[-5:])),
        target_tokens=sum(len(r) - 1 for r in rows), steps=len(timer.times))
    del trainer, model
    if not cpu:
        torch.cuda.empty_cache()
    return result
