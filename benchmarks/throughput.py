"""Throughput benchmark: qlora-ray's training function against the plain Hugging Face recipe.

One process, one GPU, the same model shape (TinyLlama-1.1B, random init), the same LoRA (r=16 on
all linear layers, NF4 + double quant, fp16 compute as on a T4), the same optimizer and learning
rate, and the same examples: each side trains one epoch over them. The examples have chat-like
lengths (lognormal, median 180, 16 to 512 tokens) and learnable content: token sequences of a
fixed random bigram chain (each token has 4 possible successors), so the held-out loss falls
from ln 32000 = 10.4 towards ln 4 = 1.39 as a model learns, and "eval loss no worse" means
something. Every side is measured on the same 64 held-out sequences with qlora-ray's own
perplexity function (summed cross-entropy over the same tokens).

Reports, per side: non-padding trained tokens/s (leaving out the first steps, which pay for
allocation and kernel selection), peak GPU memory, final train loss, held-out eval loss, and the
ratio of tokens/s to the baseline.

    python benchmarks/throughput.py --out DIR [--t4] [--variants baseline,packed,...]

``--t4`` caps the process at 15 GiB (a T4's usable memory). ``--smoke`` checks the harness on
a CPU (2 layers, a few examples; figures meaningless).

Variants (qlora-ray sides differ in one lever at a time):
  baseline            HF Trainer, per-batch padding, 8 rows per step, gradient checkpointing
  packed-gc-fullhead  qlora-ray, packed 4,096-token steps, checkpointing on, logits on every position
  packed-gc           ... the output head and fp32 loss only on target rows, in chunks (the default)
  packed-auto         ... checkpointing ``auto``: off, switched on if a step runs out of memory
  packed-2k-auto      ... and 2,048-token steps (about the baseline's optimizer steps per epoch)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_recipe import run_recipe  # noqa: E402
from make_model import SPECIALS, VOCAB, make  # noqa: E402

T4_FRACTION = 15 / 139  # of an H200's memory, so the cap is a T4's 15 GiB
SUCCESSORS = 4
VARIANTS = {
    "baseline": None,
    "packed-gc-fullhead": dict(tokens_per_step=4096, checkpointing="true", full_head=True),
    "packed-gc": dict(tokens_per_step=4096, checkpointing="true"),
    "packed-auto": dict(tokens_per_step=4096, checkpointing="auto"),
    "packed-2k-auto": dict(tokens_per_step=2048, checkpointing="auto"),
}


def chat_lengths(n: int, seed: int = 0, longest: int = 512) -> list[int]:
    """Chat-like example lengths: lognormal around 180 tokens, 16 to ``longest``."""
    r = random.Random(seed)
    return [max(16, min(longest, int(r.lognormvariate(math.log(180), 0.6)))) for _ in range(n)]


def chain_rows(lengths: list[int], eos_id: int, seed: int, vocab: int = VOCAB) -> list[list[int]]:
    """Token rows walked on a fixed random bigram chain (the same chain for every seed)."""
    table = np.random.default_rng(1234).integers(len(SPECIALS), vocab, size=(vocab, SUCCESSORS))
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        token, row = int(rng.integers(len(SPECIALS), vocab)), []
        for _ in range(n - 1):
            row.append(token)
            token = int(table[token, rng.integers(SUCCESSORS)])
        rows.append(row + [eos_id])
    return rows


def write_text_rows(path: Path, rows: list[list[int]]) -> Path:
    """Rows as ``text`` data: word-level ``t<i>`` tokenizes back to exactly these ids (the text format adds EOS)."""
    path.write_text("".join(json.dumps({"text": " ".join(f"t{i}" for i in r[:-1])}) + "\n" for r in rows))
    return path


def eval_loss(model, rows: list[list[int]], pad_id: int) -> float:
    """Held-out loss per target token, with qlora-ray's perplexity over right-padded batches."""
    from qlora_ray.data.batches import collate_padded
    from qlora_ray.data.records import Example
    from qlora_ray.evaluate import perplexity

    examples = [Example(input_ids=r, labels=list(r), row=i + 1) for i, r in enumerate(rows)]
    batches = [collate_padded(examples[i:i + 8], pad_id) for i in range(0, len(examples), 8)]
    ppl, _ = perplexity(model, batches)
    return math.log(ppl)


def run_qlora_ray(model_dir: Path, work: Path, train_file: Path, eval_file: Path, variant: dict,
                  skip_steps: int, smoke: bool) -> dict:
    """qlora-ray's ``fit`` for one epoch over the training rows, with the variant's levers."""
    from qlora_ray import loss
    from qlora_ray import train as training
    from qlora_ray.spec import load_spec

    seq, rank = variant.get("max_seq_len", 512), variant.get("r", 16)
    rows_per_step = max(1, variant["tokens_per_step"] // seq)
    work.mkdir(parents=True, exist_ok=True)
    spec_file = work / "bench.yaml"
    spec_file.write_text(f"""\
name: bench
model: {{name: {model_dir}}}
data: {{train: {train_file}, eval: {eval_file}, format: text, max_seq_len: {seq}, packing: true,
        max_eval_examples: 64, cache_dir: {work}/cache}}
quantization: {{mode: nf4, double_quant: true, compute_dtype: {"fp32" if smoke else "fp16"}}}
lora: {{r: {rank}, alpha: {2 * rank}, dropout: 0.05, target_modules: all-linear}}
train: {{lr: 2.0e-4, epochs: 1, batch_size: {rows_per_step}, warmup_ratio: 0.03, log_every: 1,
         checkpoint_every: 100000, gradient_checkpointing: {variant["checkpointing"]},
         optimizer: {"adamw" if smoke else "paged_adamw_8bit"}}}
eval: {{perplexity: true}}
resources: {{gpus_per_trial: {0 if smoke else 1}}}
output: {{dir: {work}/runs}}
""")
    spec = load_spec(spec_file)
    seen: list[dict] = []
    find_head = loss._decoder_and_head
    if variant.get("full_head"):
        # The loss as it was before the target-only head: token_loss's path for models whose
        # logits are more than head(hidden), logits on every position.
        loss._decoder_and_head = lambda model: (None, None)
    _reset_memory()
    try:
        result = training.fit(spec, lambda metrics, checkpoint: seen.append(dict(metrics)),
                              training.RunContext(trial_dir=str(work / "trial")))
    finally:
        loss._decoder_and_head = find_head
    steps = [r for r in seen if "tokens" in r and not r.get("done")]
    start = steps[min(skip_steps, len(steps) - 1) - 1] if len(steps) > 1 else steps[0]
    end = steps[-1]
    return dict(tokens_per_s=(end["tokens"] - start["tokens"]) / max(1e-9, end["train_s"] - start["train_s"]),
                peak_gib=_peak_gib(), final_loss=end["loss"], eval_loss=math.log(result.eval_ppl),
                steps=end["step"], target_tokens=end["tokens"], all_steps_tokens_per_s=result.tokens_per_s,
                gradient_checkpointing=result.gradient_checkpointing)


def _reset_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--examples", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8, help="Baseline rows per step.")
    parser.add_argument("--t4", action="store_true", help="Cap GPU memory at 15 GiB.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--smoke", action="store_true", help="Check the harness on a CPU (tiny model).")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    import bitsandbytes, peft, transformers

    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", torch=torch.__version__,
               transformers=transformers.__version__, peft=peft.__version__, bitsandbytes=bitsandbytes.__version__,
               date=time.strftime("%Y-%m-%d"), t4_cap=args.t4, examples=args.examples)
    print(json.dumps(env), flush=True)
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(T4_FRACTION if args.t4 else 1.0)
    work = Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    model_dir = make(work / "model", smoke=args.smoke)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = 16 if args.smoke else args.examples
    rows = chain_rows(chat_lengths(examples), tokenizer.eos_token_id, seed=0)
    held_out = chain_rows(chat_lengths(64, seed=1), tokenizer.eos_token_id, seed=1)
    train_file = write_text_rows(work / "train.jsonl", rows)
    eval_file = write_text_rows(work / "eval.jsonl", held_out)
    out = {"env": env, "variants": {}}
    warm = 0 if args.smoke else 5
    for name in names:
        variant = VARIANTS[name]
        if variant is None:
            result = run_recipe(str(model_dir), tokenizer, rows, batch_size=args.batch, warmup_steps=warm,
                                out_dir=str(work / "hf"), evaluate=lambda m: eval_loss(m, held_out, tokenizer.pad_token_id),
                                cpu=args.smoke)
            side = vars(result)
        else:
            # Skip the steps that cover the same share of tokens as the baseline's warmup.
            skip = max(2, round(warm * args.batch * 180 / variant["tokens_per_step"]))
            side = run_qlora_ray(model_dir, work / name, train_file, eval_file, variant, skip, args.smoke)
        out["variants"][name] = side
        print(name, json.dumps(side), flush=True)
    base = out["variants"].get("baseline")
    if base:
        for name, side in out["variants"].items():
            side["ratio"] = side["tokens_per_s"] / base["tokens_per_s"]
            side["eval_loss_vs_baseline"] = side["eval_loss"] - base["eval_loss"]
        print("\n".join(f"{n:20s} {s['tokens_per_s']:9.0f} tok/s  {s['ratio']:.2f}x  peak {s['peak_gib']:.2f} GiB  "
                        f"eval loss {s['eval_loss']:.3f}" for n, s in out["variants"].items()), flush=True)
    name = "throughput_t4.json" if args.t4 else "throughput.json"
    (args.out / name).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
