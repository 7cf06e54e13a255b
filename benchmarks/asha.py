"""ASHA against the full grid: the same 12-trial learning-rate sweep (1e-6 .. 1e-3) on one GPU,
once with every trial run to the end and once with ``search.scheduler: asha`` on the periodic
eval perplexity. Prints and writes, for both, the summed trial GPU-seconds (each trial's wall time
as Ray ran it, times its GPU share) and the best eval perplexity.

Each trial is the throughput harness's workload (TinyLlama-1.1B shape, random init, NF4 + fp16
compute, LoRA r=16 on all linear layers) on data a model learns within the run: chat-length
bigram-chain rows (each token predicts the next from a fixed random table), 640 rows, ``--steps``
optimizer steps of 8 packed rows of 512, eval every ``--every`` steps on 32 held-out rows, the
final eval on 64. Both sweeps run the trials ``--concurrent`` at a time on fractional GPUs.

    python benchmarks/asha.py --out DIR [--steps 60] [--every 6] [--grace 12] [--concurrent 4] [--runner tune]

Writes ``asha.json``, ``asha_leaderboard.md`` and ``grid_leaderboard.md``.
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
RATES = [1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 7e-4, 1e-3]


def _spec(work: Path, name: str, model_dir: Path, train_file: Path, eval_file: Path, args, scheduler: str) -> Path:
    share = round(0.9 / args.concurrent, 3)
    spec = work / f"{name}.yaml"
    spec.write_text(f"""\
name: {name}
model: {{name: {model_dir}}}
data: {{train: {train_file}, eval: {eval_file}, format: text, max_seq_len: 512, packing: true,
        max_eval_examples: 64, cache_dir: {work}/cache}}
quantization: {{mode: nf4, double_quant: true, compute_dtype: fp16}}
lora: {{r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}}
train: {{lr: 2.0e-4, max_steps: {args.steps}, batch_size: 8, warmup_ratio: 0.05, log_every: 2,
         checkpoint_every: 100000, gradient_checkpointing: true}}
eval: {{perplexity: true, every_steps: {args.every}, periodic_max_examples: 32}}
search: {{scheduler: {scheduler}, grace_period: {args.grace}, reduction_factor: 2}}
sweep: {{train.lr: {json.dumps(RATES)}}}
resources: {{gpus_per_trial: {share}, max_concurrent_trials: {args.concurrent}, runner: {args.runner}}}
output: {{dir: {work}/runs}}
""")
    return spec


def _run(name: str, spec: Path, out_dir: Path, work: Path) -> dict:
    start = time.time()
    with open(out_dir / f"{name}_submit.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "qlora_ray", "submit", str(spec), "--no-dashboard"],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "220"})
    wall = time.time() - start
    board_dir = work / "runs" / name
    board = json.loads((board_dir / "leaderboard.json").read_text())
    (out_dir / f"{name}_leaderboard.md").write_text((board_dir / "leaderboard.md").read_text())
    trials = board["trials"]
    share = float(spec.read_text().split("gpus_per_trial: ")[1].split(",")[0])
    finished = [t for t in trials if t["status"] == "finished" and t["eval_ppl"]]
    best = min(finished, key=lambda t: t["eval_ppl"]) if finished else None
    return {"submit_rc": proc.returncode, "sweep_wall_s": wall, "gpus_per_trial": share,
            "trial_gpu_s": sum((t["trial_wall_s"] or 0.0) * share for t in trials),
            "train_gpu_s": sum((t["train_wall_s"] or 0.0) * share for t in trials),
            "best_eval_ppl": best["eval_ppl"] if best else None, "best_trial": best["trial_id"] if best else None,
            "counts": board["counts"],
            "trials": [{k: t.get(k) for k in ("trial_id", "status", "step", "eval_ppl", "pruned_step",
                                                "trial_wall_s", "train_wall_s")} for t in trials]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=6)
    parser.add_argument("--grace", type=int, default=12)
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--runner", choices=("train", "tune"), default="tune")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoTokenizer

    from make_model import make
    from throughput import chain_rows, chat_lengths, write_text_rows

    work = Path(tempfile.mkdtemp(prefix="qlora-asha-"))
    model_dir = make(work / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_file = write_text_rows(work / "train.jsonl", chain_rows(chat_lengths(640), tokenizer.eos_token_id, seed=0))
    eval_file = write_text_rows(work / "eval.jsonl", chain_rows(chat_lengths(64, seed=1), tokenizer.eos_token_id, seed=1))
    out = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "trials": len(RATES),
           "rates": RATES, **{k: v for k, v in vars(args).items() if k != "out"}}
    for name, scheduler in (("grid", "none"), ("asha", "asha")):
        out[name] = _run(name, _spec(work, name, model_dir, train_file, eval_file, args, scheduler), args.out, work)
        print(name, json.dumps({k: v for k, v in out[name].items() if k != "trials"}), flush=True)
    grid, asha = out["grid"], out["asha"]
    if grid["trial_gpu_s"] and grid["best_eval_ppl"] and asha["best_eval_ppl"]:
        out["gpu_s_ratio"] = asha["trial_gpu_s"] / grid["trial_gpu_s"]
        out["best_ppl_ratio"] = asha["best_eval_ppl"] / grid["best_eval_ppl"]
    (args.out / "asha.json").write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps({k: out.get(k) for k in ("gpu", "gpu_s_ratio", "best_ppl_ratio")}), flush=True)


if __name__ == "__main__":
    main()
