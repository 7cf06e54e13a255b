"""Unsloth as a side of the throughput benchmark, in its own process (it patches transformers and
peft at import, so it is imported before them and never shares a process with another side).

    HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 python benchmarks/unsloth_side.py --work WORK
        (--out r.json | --serve) [--batches 128,64,32]

Run as its users run it: ``FastLanguageModel.from_pretrained(dir, max_seq_length=512, dtype=fp16,
load_in_4bit=True)`` (NF4 + double quant), ``get_peft_model`` with LoRA r16 / alpha 32 on all
seven projections, dropout 0 (its fast path) and ``use_gradient_checkpointing="unsloth"``
(checkpointing with activations offloaded to host memory), trained by the same HF ``Trainer``
as the HF recipe (``hf_recipe.train_with_trainer``: length-grouped batches, paged 8-bit AdamW,
the same step timer and warm-up share) with the Trainer's own checkpointing off. The batch is
the largest of ``--batches`` that fits the memory cap (the longest batch comes first).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")

import unsloth  # noqa: E402,F401  (first: it patches transformers and peft)
from unsloth import FastLanguageModel  # noqa: E402

import gc  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sides  # noqa: E402
from hf_recipe import train_with_trainer  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(model_dir: str, task: sides.Task):
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_dir, max_seq_length=task.max_seq_len, dtype=torch.float16, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model, r=task.lora_r, lora_alpha=2 * task.lora_r, lora_dropout=0.0, target_modules=PROJECTIONS,
        bias="none", use_gradient_checkpointing="unsloth", random_state=task.seed)
    return model, tokenizer


def main() -> None:
    parser = sides.side_parser(__doc__)
    parser.add_argument("--batches", default="128,64,32", help="Largest first; the first that fits is used.")
    args = parser.parse_args()
    task = sides.Task.read(args.work)
    sides.cap_memory(task.cap_gib)
    train, held = sides.rows(args.work, "train"), sides.rows(args.work, "eval")
    batches = [int(b) for b in args.batches.split(",")]

    def run_once(command: dict) -> sides.SideResult:
        started = time.time()
        for batch in list(batches):
            sides.free()
            model, tokenizer = load(str(args.work / "model"), task)
            try:
                result = train_with_trainer(model, tokenizer, train, batch, task.lr, grouped=True, checkpointing=False,
                                            warm_share=task.warm_share, out_dir=str(args.work / "unsloth_out"),
                                            max_steps=command.get("max_steps") or -1)
            except torch.OutOfMemoryError:
                print(f"unsloth: batch {batch} does not fit {task.cap_gib} GiB", flush=True)
            else:
                break
            del model  # outside the handler, whose traceback holds the failed run's tensors
            batches.remove(batch)  # later runs start at the batch that fits
            gc.collect()
        else:
            raise RuntimeError(f"unsloth: no batch of {args.batches} fits {task.cap_gib} GiB")
        peak = sides.peak_gib()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eval_loss = None
        if not command.get("warm"):
            try:
                eval_loss = sides.heldout_loss(model, held, pad)
            except Exception as e:  # report the speed even if its eval path refuses our batches
                print(f"unsloth: held-out loss failed: {type(e).__name__}: {e}", flush=True)
        return sides.SideResult(
            side="unsloth", tokens_per_s=result.tokens_per_s, peak_gib=peak, eval_loss=eval_loss,
            final_loss=result.final_loss, steps=result.steps, timed_steps=result.timed_steps,
            target_tokens=result.target_tokens, batch=batch, train_s=result.train_s,
            process_s=time.time() - started, gpu=sides.gpu_name(),
            notes={"unsloth": getattr(unsloth, "__version__", "?")})

    sides.serve_or_run(run_once, args)


if __name__ == "__main__":
    main()
