"""QLoRA against 16-bit LoRA at equal steps: the eval-perplexity gap, per ``lora.init``, rank and
learning rate.

Each setting trains the default job (``jobs/hinglish_smoke.yaml``: SmolLM2-135M-Instruct on the
Hinglish data) twice through ``train.fit`` (no Ray): once on the NF4 base (``quantization.mode:
nf4``, double quant) and once on the unquantized base (``mode: none``), with the same seed, data
order and number of steps. The gap is ``tuned ppl (nf4) / tuned ppl (16-bit) - 1``; the NF4
trial's change against the unquantized base is reported too. ``loftq`` is only defined on a
4-bit base, so its 16-bit partner is the ``default`` one.

    python benchmarks/quant_gap.py [--inits default loftq] [--ranks 16 32] [--lrs 2e-3 1e-3]
                                   [--steps 16] [--out benchmarks/results/quant_gap]
                                   [KEY=VALUE ...]   # extra spec overrides for every run

Writes ``<out>.json`` and ``<out>.md`` (the table, the command, the date and the load average:
on a shared CPU wall times are not comparable, perplexities are).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
JOB = ROOT / "jobs" / "hinglish_smoke.yaml"


def run_one(work: Path, name: str, overrides: list) -> dict:
    """Train one setting of the default job into ``work/name``; its final figures."""
    from qlora_ray import train
    from qlora_ray.spec import load_spec

    # A spec inheriting the job, writing into ``work`` (an absolute output.dir outside the
    # project is refused as an override of the job's relative one).
    wrapper = work / "job.yaml"
    wrapper.write_text(f"base: {JOB}\noutput: {{dir: {work}}}\n", encoding="utf-8")
    spec = load_spec(wrapper, overrides)
    start = time.time()
    final = train.fit(spec, lambda metrics, checkpoint: None, train.RunContext(trial_dir=str(work / name)))
    out = final.fields()
    out["wall_s"] = time.time() - start
    return out


def settings(args) -> list:
    """(init, rank, lr) for every combination asked for."""
    return [(init, r, lr) for init in args.inits for r in args.ranks for lr in args.lrs]


def measure(args, work: Path) -> list:
    rows, full_runs = [], {}
    for init, r, lr in settings(args):
        common = [f"lora.r={r}", f"lora.alpha={2 * r}", f"train.lr={lr}", f"train.max_steps={args.steps}",
                  "eval.prompts=null", *args.overrides]
        q = run_one(work, f"nf4_{init}_r{r}_lr{lr:g}", common + [f"lora.init={init}", "quantization.mode=nf4"])
        partner = "default" if init == "loftq" else init
        key = (partner, r, lr)
        if key not in full_runs:
            full_runs[key] = run_one(work, f"none_{partner}_r{r}_lr{lr:g}",
                                     common + [f"lora.init={partner}", "quantization.mode=none"])
        f = full_runs[key]
        rows.append({"init": init, "r": r, "lr": lr, "steps": args.steps,
                     "base_nf4": q["base_ppl"], "base_16bit": f["base_ppl"],
                     "tuned_nf4": q["eval_ppl"], "tuned_16bit": f["eval_ppl"],
                     "gap": q["eval_ppl"] / f["eval_ppl"] - 1.0,
                     "nf4_change_vs_16bit_base": q["eval_ppl"] / f["base_ppl"] - 1.0,
                     "eval_tokens": q["eval_tokens"], "wall_s_nf4": q["wall_s"], "wall_s_16bit": f["wall_s"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def to_markdown(rows: list, command: str, load: str) -> str:
    lines = ["# QLoRA (NF4 + double quant) vs 16-bit LoRA at equal steps", "",
             f"`{command}`", "", f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
             f"at the end: {load} (wall times are not comparable on a loaded machine; perplexities are).", "",
             "| lora.init | r | lr | steps | base nf4 | base 16-bit | tuned nf4 | tuned 16-bit | gap (nf4 vs 16-bit) "
             "| nf4 tuned vs 16-bit base |", "|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['init']} | {x['r']} | {x['lr']:g} | {x['steps']} | {x['base_nf4']:.2f} | "
                     f"{x['base_16bit']:.2f} | {x['tuned_nf4']:.2f} | {x['tuned_16bit']:.2f} | {x['gap']:+.1%} | "
                     f"{x['nf4_change_vs_16bit_base']:+.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inits", nargs="+", default=["default", "loftq", "gaussian"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--lrs", nargs="+", type=float, default=[2e-3, 1e-3])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quant_gap"))
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE spec overrides for every run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="quant_gap-") as tmp:
        rows = measure(args, Path(tmp))
    command = "python benchmarks/quant_gap.py " + " ".join(sys.argv[1:])
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "load_average": load, "rows": rows},
                                                   indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(rows, command, load))
    print(to_markdown(rows, command, load))


if __name__ == "__main__":
    main()
