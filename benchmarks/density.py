"""Sweep density: a 12-trial grid on one GPU through ``qlora-ray submit`` with fractional GPUs,
against the same trials one after another with the plain Hugging Face recipe.

Each trial is the throughput harness's workload (TinyLlama-1.1B shape, random init, NF4 + fp16
compute, LoRA on all linear layers, one epoch over 320 chat-length bigram-chain rows, held-out
loss on 64 more). The grid is LoRA rank (8, 16, 32) x learning rate (1e-4, 2e-4, 3e-4, 5e-4).
The baseline side runs one trial of the recipe (model load, training, held-out loss) and counts
its wall time 12 times: its trials differ only in two numbers, not in cost.

    python benchmarks/density.py --out DIR [--gpus-per-trial 0.075] [--runner tune|train] [--baseline-trial-s S]

Writes ``density.json`` and ``density_leaderboard.md`` (the leaderboard as qlora-ray wrote it,
with the Ray overhead per trial: trial wall time minus the training function's own).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpus-per-trial", type=float, default=0.075)
    parser.add_argument("--runner", choices=("train", "tune"), default="tune",
                        help="resources.runner of the grid (tune: each trial trains in its Tune process).")
    parser.add_argument("--baseline-trial-s", type=float,
                        help="Skip the baseline run and use this measured wall time of one baseline trial.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoTokenizer

    from hf_recipe import run_recipe
    from make_model import make
    from throughput import chain_rows, chat_lengths, eval_loss, write_text_rows

    work = Path(tempfile.mkdtemp(prefix="qlora-density-"))
    model_dir = make(work / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = chain_rows(chat_lengths(320), tokenizer.eos_token_id, seed=0)
    held_out = chain_rows(chat_lengths(64, seed=1), tokenizer.eos_token_id, seed=1)
    train_file = write_text_rows(work / "train.jsonl", rows)
    eval_file = write_text_rows(work / "eval.jsonl", held_out)
    torch.cuda.empty_cache()
    out = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0),
           "gpus_per_trial": args.gpus_per_trial, "runner": args.runner, "trials": 12}

    if args.baseline_trial_s:
        out["baseline_trial_wall_s"] = args.baseline_trial_s
        out["baseline_12_trials_s"] = 12 * args.baseline_trial_s
    else:
        start = time.time()
        base = run_recipe(str(model_dir), tokenizer, rows, batch_size=8, warmup_steps=5, out_dir=str(work / "hf"),
                          evaluate=lambda m: eval_loss(m, held_out, tokenizer.pad_token_id))
        out["baseline_trial_wall_s"] = time.time() - start
        out["baseline_12_trials_s"] = 12 * out["baseline_trial_wall_s"]
        out["baseline"] = vars(base)
        print("baseline", json.dumps(out), flush=True)
        torch.cuda.empty_cache()

    spec = work / "density.yaml"
    spec.write_text(f"""\
name: density
model: {{name: {model_dir}}}
data: {{train: {train_file}, eval: {eval_file}, format: text, max_seq_len: 512, packing: true,
        max_eval_examples: 64, cache_dir: {work}/cache}}
quantization: {{mode: nf4, double_quant: true, compute_dtype: fp16}}
lora: {{r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}}
train: {{lr: 2.0e-4, epochs: 1, batch_size: 8, warmup_ratio: 0.03, log_every: 2, checkpoint_every: 100000}}
eval: {{perplexity: true}}
sweep: {{lora.r: [8, 16, 32], train.lr: [1.0e-4, 2.0e-4, 3.0e-4, 5.0e-4]}}
resources: {{gpus_per_trial: {args.gpus_per_trial}, runner: {args.runner}}}
output: {{dir: {work}/runs}}
""")
    start = time.time()
    with open(args.out / "density_submit.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "qlora_ray", "submit", str(spec), "--no-dashboard"],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "220"})
    out["qlora_ray_12_trials_s"] = time.time() - start
    out["submit_rc"] = proc.returncode
    board_dir = work / "runs" / "density"
    if (board_dir / "leaderboard.json").is_file():
        board = json.loads((board_dir / "leaderboard.json").read_text())
        rows_ = board["trials"] if isinstance(board, dict) and "trials" in board else board
        out["leaderboard"] = rows_
        (args.out / "density_leaderboard.md").write_text((board_dir / "leaderboard.md").read_text())
    if "baseline_12_trials_s" in out:
        out["ratio_of_baseline_time"] = out["qlora_ray_12_trials_s"] / out["baseline_12_trials_s"]
    (args.out / "density.json").write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps({k: v for k, v in out.items() if k != "leaderboard"}, default=str), flush=True)


if __name__ == "__main__":
    main()
