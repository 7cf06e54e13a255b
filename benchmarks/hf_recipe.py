"""The Hugging Face QLoRA recipe, as a user would write it without qlora-ray.

bitsandbytes NF4 + double quant, peft LoRA on all linear layers, HF ``Trainer`` with per-batch
padding, gradient checkpointing, SDPA, ``use_cache`` off, paged 8-bit AdamW. Two forms:

- naive: 8 rows a step in random order (what most tutorials show);
- tuned: length-grouped batches (``train_sampling_strategy: group_by_length``) and the largest
  batch of 8/16/32/48/64 that fits the memory cap, found here by trying the largest first (the
  length-grouped sampler puts the longest batch first, so a batch too large fails at step 1).

As a side of the throughput benchmark (its own process)::

    python benchmarks/hf_recipe.py --work WORK (--out result.json | --serve) [--tuned] [--batch 8] [--max-steps N]

``train_with_trainer`` is also what the Unsloth side trains with, so both time the same things.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sides  # noqa: E402

TUNED_BATCHES = (64, 48, 32, 16, 8)


@dataclass
class RecipeResult:
    tokens_per_s: float
    peak_gib: float
    final_loss: float
    target_tokens: int
    steps: int
    eval_loss: Optional[float] = None
    timed_steps: int = 0
    train_s: float = 0.0
    batch: Optional[int] = None


def _timer_callback(clock: "sides.Clock", losses: list):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Times each optimizer step with a device sync (the batch is already collated)."""

        def on_step_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.stop()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return StepTimer()


def train_with_trainer(model, tokenizer, rows: List[List[int]], batch_size: int, lr: float,
                       grouped: bool, checkpointing: bool, warm_share: float, out_dir: str,
                       max_steps: int = -1, cpu: bool = False, compute_dtype=torch.float16) -> RecipeResult:
    """One epoch (or ``max_steps``) of HF ``Trainer`` over ``rows`` (trained on every token)."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    dataset = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids} for ids in rows]
    steps = max_steps if max_steps > 0 else -(-len(rows) // batch_size)
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch_size, num_train_epochs=1, max_steps=max_steps,
        learning_rate=lr, fp16=compute_dtype == torch.float16 and not cpu, bf16=compute_dtype == torch.bfloat16,
        optim="adamw_torch" if cpu else "paged_adamw_8bit", use_cpu=cpu, logging_steps=1, save_strategy="no",
        report_to=[], gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        train_sampling_strategy="group_by_length" if grouped else "random",
        dataloader_num_workers=0, disable_tqdm=True, lr_scheduler_type="cosine",
        warmup_steps=max(1, round(0.03 * steps)), seed=42)
    clock, losses = sides.Clock(), []
    pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    batch_tokens: List[int] = []

    def collate(features):
        # The trained target tokens of each batch (labels shift by one), in the order taken.
        batch_tokens.append(sum(len(f["input_ids"]) - 1 for f in features))
        return pad(features)

    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
    trainer.add_callback(_timer_callback(clock, losses))
    trainer.train()
    step_tokens = batch_tokens[:len(clock.times)]
    rate, timed = sides.timed_rate(step_tokens, clock.times, warm_share)
    del trainer
    return RecipeResult(tokens_per_s=rate, peak_gib=sides.peak_gib(),
                        final_loss=sum(losses[-5:]) / max(1, len(losses[-5:])), target_tokens=sum(step_tokens),
                        steps=len(clock.times), timed_steps=timed, train_s=sum(clock.times))


def load_peft_model(model_dir: str, lora_r: int = 16, compute_dtype=torch.float16, cpu: bool = False,
                    checkpointing: bool = True):
    """The recipe's model: NF4 + double quant, SDPA, no KV cache, LoRA r on all linear layers."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if cpu:
        compute_dtype = torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=compute_dtype,
                                                 device_map={"": "cpu" if cpu else 0}, attn_implementation="sdpa")
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    return get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.05,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def run_recipe(model_dir: str, tokenizer, rows: List[List[int]], batch_size: int, warmup_steps: int = 0,
               compute_dtype=torch.float16, lora_r: int = 16, out_dir: str = "/tmp/hf_recipe",
               evaluate: Optional[Callable] = None, cpu: bool = False, grouped: bool = False,
               lr: float = 2e-4, warm_share: Optional[float] = None, max_steps: int = -1) -> RecipeResult:
    """Load the recipe's model, train one epoch over ``rows`` and time it; ``evaluate(model)``
    gives the held-out loss afterwards. Leaves out ``warm_share`` of the tokens (else the
    share ``warmup_steps`` batches of 180-token rows would hold). ``cpu`` only checks the harness."""
    if not cpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = load_peft_model(model_dir, lora_r, compute_dtype, cpu)
    if warm_share is None:
        warm_share = min(0.5, warmup_steps * batch_size * 180 / max(1, sum(len(r) for r in rows)))
    result = train_with_trainer(model, tokenizer, rows, batch_size, lr, grouped, True, warm_share, out_dir,
                                max_steps=max_steps, cpu=cpu, compute_dtype=compute_dtype)
    if evaluate is not None:
        model.qlora_compute_dtype = compute_dtype  # what qlora-ray's perplexity autocasts to
        result.eval_loss = evaluate(model)
    del model
    _free(cpu)
    return result


def _free(cpu: bool) -> None:
    gc.collect()
    if not cpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def tuned(model_dir: str, tokenizer, rows, task: "sides.Task", out_dir: str, batches=TUNED_BATCHES,
          cpu: bool = False, evaluate: Optional[Callable] = None, max_steps: int = -1) -> RecipeResult:
    """The tuned recipe: length-grouped, the largest batch of ``batches`` that fits the cap."""
    for batch in batches:
        try:
            result = run_recipe(model_dir, tokenizer, rows, batch, out_dir=out_dir, cpu=cpu, grouped=True,
                                lr=task.lr, warm_share=task.warm_share, lora_r=task.lora_r, evaluate=evaluate,
                                max_steps=max_steps)
        except torch.OutOfMemoryError:
            print(f"hf tuned: batch {batch} does not fit {task.cap_gib} GiB", flush=True)
        else:
            result.batch = batch
            return result
        _free(cpu)  # outside the handler, whose traceback holds the failed run's tensors
    raise RuntimeError(f"no batch of {batches} fits {task.cap_gib} GiB")


def main() -> None:
    parser = sides.side_parser(__doc__)
    parser.add_argument("--tuned", action="store_true", help="Length-grouped, largest batch that fits.")
    parser.add_argument("--batch", type=int, default=8, help="Rows a step (naive form); with --tuned: try only this.")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    task = sides.Task.read(args.work)
    sides.cap_memory(task.cap_gib)
    from transformers import AutoTokenizer

    model_dir = str(args.work / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, held = sides.rows(args.work, "train"), sides.rows(args.work, "eval")
    out_dir = str(args.work / "hf_out")
    found = {}

    def run_once(command: dict) -> sides.SideResult:
        started = time.time()
        max_steps = command.get("max_steps") or args.max_steps
        evaluate = None if command.get("warm") else (lambda m: sides.heldout_loss(m, held, tokenizer.pad_token_id))
        if args.tuned:
            choices = (found["batch"],) if "batch" in found else (args.batch,) if args.batch != 8 else TUNED_BATCHES
            result = tuned(model_dir, tokenizer, train, task, out_dir, choices, args.cpu, evaluate, max_steps)
            found["batch"], name = result.batch, "hf-tuned"
        else:
            result = run_recipe(model_dir, tokenizer, train, args.batch, out_dir=out_dir, cpu=args.cpu, lr=task.lr,
                                warm_share=task.warm_share, lora_r=task.lora_r, evaluate=evaluate,
                                max_steps=max_steps)
            result.batch, name = args.batch, f"hf-b{args.batch}"
        return sides.SideResult(
            side=name, tokens_per_s=result.tokens_per_s, peak_gib=result.peak_gib, eval_loss=result.eval_loss,
            final_loss=result.final_loss, steps=result.steps, timed_steps=result.timed_steps,
            target_tokens=result.target_tokens, batch=result.batch, train_s=result.train_s,
            process_s=time.time() - started, gpu=sides.gpu_name())

    sides.serve_or_run(run_once, args)


if __name__ == "__main__":
    main()
