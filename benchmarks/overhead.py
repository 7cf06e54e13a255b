"""Ray's share of a trial, by runner: the same small grid through ``qlora-ray submit`` with
``resources.runner`` train (a TorchTrainer per trial) and tune (each trial trains in its Tune
process), one trial at a time so no trial waits on another's start-up.

Each trial is a narrow 2-layer Llama (random init) trained for a few steps, so nearly all of
its wall time is start-up. Per trial the leaderboard gives its wall time as the runtime saw it,
the wall time of the training function, and the split of the rest (worker start, worker setup,
teardown); the whole command is timed too (Ray start, base model, trials, leaderboard).

    python benchmarks/overhead.py --out DIR [--runners train tune] [--trials 4] [--gpus-per-trial 0]

Writes ``overhead.json`` and prints one line per runner.
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


def write_spec(work: Path, args) -> Path:
    """The grid: ranks 2, 4, 8, ... (``--trials`` of them) over the narrow model, 3 steps each."""
    from transformers import AutoTokenizer

    from make_model import make
    from throughput import chain_rows, chat_lengths, write_text_rows

    model_dir = make(work / "model", smoke=True)
    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    train = write_text_rows(work / "train.jsonl", chain_rows(chat_lengths(32), eos, seed=0))
    held_out = write_text_rows(work / "eval.jsonl", chain_rows(chat_lengths(8, seed=1), eos, seed=1))
    ranks = [2 ** (i + 1) for i in range(args.trials)]
    spec = work / "overhead.yaml"
    spec.write_text(f"""\
name: overhead
model: {{name: {model_dir}}}
data: {{train: {train}, eval: {held_out}, format: text, max_seq_len: 256, cache_dir: {work}/cache}}
quantization: {{mode: nf4, compute_dtype: {"fp16" if args.gpus_per_trial else "fp32"}}}
lora: {{r: 8, alpha: 16, dropout: 0.0}}
train: {{max_steps: 3, batch_size: 4, log_every: 1}}
eval: {{perplexity: true}}
sweep: {{lora.r: {ranks}}}
resources: {{gpus_per_trial: {args.gpus_per_trial}, max_concurrent_trials: 1}}
output: {{dir: {work}/runs}}
""")
    return spec


def run(spec: Path, runner: str, log: Path) -> dict:
    """One timed ``qlora-ray submit`` of the grid with ``runner``; its per-trial figures."""
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "qlora_ray", "submit", str(spec), f"resources.runner={runner}",
                               "--fresh", "--no-dashboard"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "COLUMNS": "200"})
    wall = time.time() - start
    board = json.loads((spec.parent / "runs" / "overhead" / "leaderboard.json").read_text())
    keys = ("trial_id", "trial_wall_s", "train_wall_s", "overhead_s", "overhead_worker_start_s",
            "overhead_worker_setup_s", "overhead_teardown_s")
    return {"runner": runner, "rc": proc.returncode, "submit_wall_s": round(wall, 1),
            "trials": [{k: t.get(k) for k in keys} for t in board["trials"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runners", nargs="+", choices=("train", "tune"), default=["train", "tune"])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--gpus-per-trial", type=float, default=0.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    spec = write_spec(Path(tempfile.mkdtemp(prefix="qlora-overhead-")), args)
    out = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "gpus_per_trial": args.gpus_per_trial,
           "runs": [run(spec, runner, args.out / f"overhead_{runner}.log") for runner in args.runners]}
    (args.out / "overhead.json").write_text(json.dumps(out, indent=1))
    for r in out["runs"]:
        spans = sorted(t["overhead_s"] for t in r["trials"] if t["overhead_s"] is not None)
        print(f"runner {r['runner']}: rc {r['rc']}, submit {r['submit_wall_s']} s, Ray overhead per trial "
              f"{spans[0]:.1f}-{spans[-1]:.1f} s" if spans else f"runner {r['runner']}: rc {r['rc']}, no trial figures",
              flush=True)


if __name__ == "__main__":
    main()
