"""Cost growth of one qlora-ray trial: tokens/s and peak GPU memory against max_seq_len and LoRA rank.

TinyLlama-1.1B shape (random init), NF4 + fp16 compute, the shipped defaults (packing,
gradient checkpointing on, the output head on target rows only), 4,096 tokens per step, under the
T4 memory cap. Each point trains 10 steps on bigram-chain rows of exactly max_seq_len tokens
(the first 3 steps left out of tokens/s).

    python benchmarks/cost_growth.py --out DIR              # on a GPU: cost_growth.json
    python benchmarks/cost_growth.py --plot DIR/cost_growth.json --to benchmarks/cost_growth.png
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SEQ_LENS = [256, 512, 1024, 2048]
RANKS = [8, 16, 32, 64]
STEPS, SKIP, TOKENS_PER_STEP = 10, 3, 4096


def measure(out: Path, smoke: bool) -> Path:
    import torch
    from transformers import AutoTokenizer

    import sides
    from make_model import make
    from throughput import chain_rows, run_qlora_ray, write_text_rows

    sides.cap_memory(15.0)  # a T4's usable memory, of whatever GPU runs this
    work = Path(tempfile.mkdtemp(prefix="qlora-cost-"))
    model_dir = make(work / "model", smoke=smoke)
    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    points = [dict(max_seq_len=s, r=16) for s in SEQ_LENS] + [dict(max_seq_len=512, r=r) for r in RANKS if r != 16]
    results = []
    for point in points:
        seq = point["max_seq_len"]
        n = (2 if smoke else STEPS) * max(1, TOKENS_PER_STEP // seq)
        folder = work / f"s{seq}_r{point['r']}"
        folder.mkdir()
        train = write_text_rows(folder / "train.jsonl", chain_rows([seq] * n, eos, seed=seq))
        held = write_text_rows(folder / "eval.jsonl", chain_rows([seq] * 4, eos, seed=seq + 1))
        variant = dict(tokens_per_step=TOKENS_PER_STEP, checkpointing="true", **point)
        side = run_qlora_ray(model_dir, folder, train, held, variant, 1 if smoke else SKIP, smoke)
        results.append({**point, **side})
        print(json.dumps(results[-1]), flush=True)
    path = out / "cost_growth.json"
    path.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "tokens_per_step": TOKENS_PER_STEP,
                                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                                "points": results}, indent=1))
    return path


def plot(path: Path, to: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = json.loads(path.read_text())["points"]
    by_seq = sorted((p for p in points if p["r"] == 16), key=lambda p: p["max_seq_len"])
    by_rank = sorted((p for p in points if p["max_seq_len"] == 512), key=lambda p: p["r"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, series, key, label in ((axes[0], by_seq, "max_seq_len", "max_seq_len (r=16)"),
                                   (axes[1], by_rank, "r", "LoRA rank (max_seq_len=512)")):
        xs = [p[key] for p in series]
        ax.plot(xs, [p["tokens_per_s"] for p in series], "o-", color="tab:blue")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(label)
        ax.set_ylabel("tokens/s", color="tab:blue")
        ax.set_ylim(0, max(p["tokens_per_s"] for p in points) * 1.15)
        twin = ax.twinx()
        twin.plot(xs, [p["peak_gib"] for p in series], "s--", color="tab:red")
        twin.axhline(15, color="tab:red", lw=0.8, ls=":")
        twin.set_ylabel("peak GiB (T4 budget 15)", color="tab:red")
        twin.set_ylim(0, 16)
    fig.suptitle("qlora-ray trial cost, TinyLlama-1.1B shape, NF4 + fp16, 4,096 tokens/step, checkpointing on, T4 cap")
    fig.tight_layout()
    fig.savefig(to, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, help="A cost_growth.json to plot (no GPU needed).")
    parser.add_argument("--to", type=Path, default=Path("benchmarks/cost_growth.png"))
    parser.add_argument("--smoke", action="store_true", help="Check the harness on a CPU (tiny model).")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot, args.to)
        print(args.to)
    elif args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        print(measure(args.out, args.smoke))
    else:
        parser.error("give --out DIR (measure) or --plot FILE (plot)")


if __name__ == "__main__":
    main()
