"""Throughput benchmark: qlora-ray's training function against the plain Hugging Face recipe.

One process, one GPU, the same model shape (TinyLlama-1.1B, random init), the same chat-like
example lengths (lognormal, median 180, max 512 tokens), the same LoRA (r=16 on all linear
layers, NF4 + double quant, fp16 compute as on a T4) and the same examples: each side trains one
epoch over them. Reports non-padding trained tokens/s (leaving out the first steps, which pay
for allocation and kernel selection), peak GPU memory and final loss, and the ratio.

    python benchmarks/throughput.py --out DIR [--examples 320] [--t4]

``--t4`` caps the process at 15 GiB (a T4's usable memory) for both sides.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_recipe import run_recipe  # noqa: E402
from make_model import SPECIALS, VOCAB, make  # noqa: E402

T4_FRACTION = 15 / 139  # of an H200's memory, so the cap is a T4's 15 GiB


def chat_lengths(n: int, seed: int = 0) -> list[int]:
    """Chat-like example lengths: lognormal around 180 tokens, 16 to 512."""
    r = random.Random(seed)
    return [max(16, min(512, int(r.lognormvariate(math.log(180), 0.6)))) for _ in range(n)]


def random_rows(lengths: list[int], eos_id: int) -> list[list[int]]:
    rows = []
    for i, n in enumerate(lengths):
        g = torch.Generator().manual_seed(i)
        rows.append(torch.randint(len(SPECIALS), VOCAB, (n - 1,), generator=g).tolist() + [eos_id])
    return rows


def run_qlora_ray(model_dir: Path, rows: list[list[int]], work: Path, tokens_per_step: int,
                  skip_steps: int, gradient_checkpointing: bool = True) -> dict:
    """Train qlora-ray's ``fit`` one epoch over the same rows, written as ``text`` data."""
    from qlora_ray.spec import load_spec
    from qlora_ray.train import RunContext, fit

    data = work / "train.jsonl"
    # Word-level ids: "t17 t4012 ..." tokenizes back to exactly these ids; the text format adds EOS.
    data.write_text("".join(json.dumps({"text": " ".join(f"t{i}" for i in r[:-1])}) + "\n" for r in rows))
    spec_file = work / "bench.yaml"
    spec_file.write_text(f"""\
name: bench
model: {{name: {model_dir}}}
data: {{train: {data}, eval: {data}, format: text, max_seq_len: 512, packing: true,
        max_eval_examples: 8, cache_dir: {work}/cache}}
quantization: {{mode: nf4, double_quant: true, compute_dtype: fp16}}
lora: {{r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}}
train: {{lr: 2.0e-4, epochs: 1, batch_size: {tokens_per_step // 512}, warmup_ratio: 0.03, log_every: 1,
         checkpoint_every: 100000, gradient_checkpointing: {str(gradient_checkpointing).lower()}}}
eval: {{perplexity: false}}
resources: {{gpus_per_trial: 1}}
output: {{dir: {work}/runs}}
""")
    spec = load_spec(spec_file)
    rows_seen: list[dict] = []
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result = fit(spec, lambda metrics, checkpoint: rows_seen.append(dict(metrics)),
                 RunContext(trial_dir=str(work / "trial")))
    steps = [r for r in rows_seen if "tokens" in r and not r.get("done")]
    start = steps[skip_steps - 1] if len(steps) > skip_steps else steps[0]
    end = steps[-1]
    return dict(tokens_per_s=(end["tokens"] - start["tokens"]) / (end["train_s"] - start["train_s"]),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30, final_loss=end["loss"],
                steps=end["step"], target_tokens=end["tokens"], all_steps_tokens_per_s=result.tokens_per_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--examples", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8, help="Baseline rows per step.")
    parser.add_argument("--tokens-per-step", type=int, default=4096, help="qlora-ray packed tokens per step.")
    parser.add_argument("--t4", action="store_true", help="Cap GPU memory at 15 GiB for both sides.")
    parser.add_argument("--only", choices=["baseline", "qlora-ray"], help="Run one side.")
    args = parser.parse_args()
    import bitsandbytes, peft, transformers

    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, transformers=transformers.__version__,
               peft=peft.__version__, bitsandbytes=bitsandbytes.__version__,
               date=time.strftime("%Y-%m-%d"), t4_cap=args.t4, examples=args.examples)
    print(json.dumps(env), flush=True)
    torch.cuda.set_per_process_memory_fraction(T4_FRACTION if args.t4 else 1.0)
    work = Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    model_dir = make(work / "model")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = random_rows(chat_lengths(args.examples), tokenizer.eos_token_id)
    out = {"env": env}
    warm = 5
    if args.only != "qlora-ray":
        base = run_recipe(str(model_dir), tokenizer, rows, batch_size=args.batch, warmup_steps=warm,
                          out_dir=str(work / "hf"))
        out["baseline"] = vars(base)
        print("baseline", json.dumps(out["baseline"]), flush=True)
    if args.only != "baseline":
        # Skip the steps that cover the same share of tokens as the baseline's warmup.
        skip = max(2, round(warm * args.batch * 180 / args.tokens_per_step))
        out["qlora_ray"] = run_qlora_ray(model_dir, rows, work, args.tokens_per_step, skip)
        print("qlora-ray", json.dumps(out["qlora_ray"]), flush=True)
    if "baseline" in out and "qlora_ray" in out:
        out["ratio_tokens_per_s"] = out["qlora_ray"]["tokens_per_s"] / out["baseline"]["tokens_per_s"]
        print(f"ratio {out['ratio_tokens_per_s']:.2f}x", flush=True)
    name = "throughput_t4.json" if args.t4 else "throughput.json"
    (args.out / name).write_text(json.dumps(out, indent=1))
    torch.cuda.set_per_process_memory_fraction(1.0)


if __name__ == "__main__":
    main()
