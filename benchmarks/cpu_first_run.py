"""Where the first hour's time goes on a CPU: the default job's phases, the 2-trial submit's
phases, and the levers that move them, measured in one process run each.

    python benchmarks/cpu_first_run.py train  [--out benchmarks/results/cpu_first_run] [KEY=VALUE ...]
    python benchmarks/cpu_first_run.py levers [--out ...] [--steps 3] [--rounds 2] [--threads 1] [--only WORDS]
    python benchmarks/cpu_first_run.py submit [--out ...]

``train`` runs ``jobs/hinglish_smoke.yaml`` as ``qlora-ray train`` does (fresh output folder,
the base figures measured, not cached) and times imports, model location/conversion,
tokenizer and data, the NF4 load, LoRA, base perplexity and replies, every train step, the
adapter, tuned perplexity and replies; then a second run of the same job, whose base figures
come from the cache. ``levers`` times train steps and generation of the default job's model
under one setting and another, alternating, so a loaded machine affects both alike (compare
ratios): the NF4 base dequantized per forward against kept dequantized, max_seq_len, eval passes
and sample replies on either, torch threads, the NF4 base against an unquantized one, the fused path against
peft, LoRA dropout, tokens per step, batched generation with the KV cache, the base-figure
cache. ``submit`` runs the job as a 2-trial sweep through a local Ray (``qlora-ray submit``)
and splits its wall time (Ray start, base-model task, trial start, trials, leaderboard) from
its output and records.

Each writes ``<out>/<kind>.json`` and ``<out>/<kind>.md`` with the load average before and
after: timings on a machine busy with other work are slower and noisier, so say the load
beside every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "hinglish_smoke.yaml"
T0 = time.perf_counter()


def load() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> Dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}


class Phases:
    """Wall seconds per named phase, in order; a phase named twice accumulates."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}
        self.steps: List[float] = []
        self.undone: list = []

    @contextmanager
    def __call__(self, name: str):
        tick = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - tick

    def wrap(self, owner, attr: str, name: str, into_steps: bool = False) -> None:
        """Time every call of ``owner.attr`` under ``name`` until :meth:`undo`."""
        real = getattr(owner, attr)
        self.undone.append((owner, attr, real))

        def timed(*args, **kwargs):
            tick = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                spent = time.perf_counter() - tick
                self.seconds[name] = self.seconds.get(name, 0.0) + spent
                if into_steps:
                    self.steps.append(round(spent, 3))

        setattr(owner, attr, timed)

    def undo(self) -> None:
        for owner, attr, real in reversed(self.undone):
            setattr(owner, attr, real)
        self.undone = []


# ---------------------------------------------------------------- train: the default job's phases

def run_train(out: Path, overrides: List[str]) -> Dict:
    phases = Phases()
    before = load()
    with phases("imports (torch, transformers, peft, bitsandbytes, qlora_ray)"):
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import torch
        import transformers  # noqa: F401

        from qlora_ray import evaluate, model
        from qlora_ray import train as training
        from qlora_ray.spec import load_spec
        from qlora_ray.train import loop
    work = Path(tempfile.mkdtemp(prefix="cpu_first_run_"))
    # A fresh data and base-figure cache; the converted model is the user's own when it exists
    # (conversion happens once per machine; timed below when it has not happened yet).
    (work / "cache").mkdir()
    converted = Path(os.path.expanduser("~/.cache/qlora-ray/models"))
    if converted.is_dir():
        os.symlink(converted, work / "cache" / "models")
    spec = load_spec(JOB, [f"output.dir={work / 'runs'}", f"data.cache_dir={work / 'cache'}", *overrides])
    with phases("model: locate (a GGUF model is converted once)"):
        model.resolve_source(spec.model, spec.data.cache_dir)
    runs = {}
    for run in ("first", "second"):
        phases = phases if run == "first" else Phases()
        for owner, attr, name in ((loop, "load_base", "model: load + NF4 quantize"),
                                  (loop.data, "prepare", "data: tokenize (or cache)"),
                                  (loop, "add_lora", "LoRA: add adapters"),
                                  (loop, "base_key", "base figures: cache key (hashes)"),
                                  (evaluate, "perplexity", "eval: perplexity passes (base + tuned)"),
                                  (evaluate, "generate_replies", "eval: sample replies (base + tuned)"),
                                  (loop, "save_adapter", "adapter: save"),
                                  (loop.ckpt, "save_checkpoint", "checkpoints: save")):
            phases.wrap(owner, attr, name)
        phases.wrap(loop, "step_with_fallback", "train: steps", into_steps=True)
        tick = time.perf_counter()
        try:
            result = training.fit(spec, lambda m, c: None, training.RunContext(trial_dir=str(work / "runs" / run)))
        finally:
            phases.undo()
        wall = time.perf_counter() - tick
        runs[run] = {"fit_wall_s": round(wall, 2), "phases_s": {k: round(v, 2) for k, v in phases.seconds.items()},
                     "step_s": phases.steps, "base_ppl": result.base_ppl, "tuned_ppl": result.eval_ppl,
                     "ppl_change": result.ppl_change, "tokens_per_s": result.tokens_per_s,
                     "torch_threads": torch.get_num_threads(), "load_after": load()}
    return {"kind": "train", "job": str(JOB.relative_to(ROOT)), "overrides": overrides, "machine": machine(),
            "load_before": before, "load_after": load(), "process_s": round(time.perf_counter() - T0, 2),
            "runs": runs, "note": "the second run's base figures come from the base-figure cache"}


# ---------------------------------------------------------------- levers

def _median_runs(runs: List[Dict]) -> Dict:
    """One variant's figures over alternating rounds: the median of each number, the lists kept."""
    if len(runs) == 1:
        return runs[0]
    merged: Dict = {}
    for key, value in runs[0].items():
        values = [r[key] for r in runs]
        merged[key] = round(statistics.median(values), 3) if isinstance(value, (int, float)) else values
    return merged


def run_levers(out: Path, steps: int, overrides: List[str], only: List[str] = (), rounds: int = 1) -> Dict:
    import torch

    from qlora_ray import data, evaluate
    from qlora_ray.base_cache import base_key, lookup
    from qlora_ray.model import add_lora, load_base
    from qlora_ray.spec import load_spec
    from qlora_ray.train.fused import _fused
    from qlora_ray.train.optim import build_parts
    from qlora_ray.train.step import step as one_step

    before = load()
    base_spec = load_spec(JOB, overrides)
    loaded: Dict[str, tuple] = {}

    def model_for(quant: str, dropout: float, kept: bool = True):
        kind = quant if kept else f"{quant} per forward"
        settings = [*overrides, f"quantization.mode={quant}", f"quantization.cpu_dequantize={str(kept).lower()}"]
        if kind not in loaded:
            spec = load_spec(JOB, settings)
            tick = time.perf_counter()
            m, tok, dtype, _ = load_base(spec)
            loaded[kind] = (m, tok, dtype, time.perf_counter() - tick)
        m, tok, dtype, _ = loaded[kind]
        spec = load_spec(JOB, [*settings, f"lora.dropout={dropout}"])
        torch.manual_seed(0)
        peft_model = add_lora(m, spec)
        return peft_model, tok, dtype, spec

    def step_time(quant="nf4", dropout=0.05, fused=False, batch=4, threads=None, kept=True, seq=None) -> Dict:
        peft_model, tok, dtype, spec = model_for(quant, dropout, kept)
        if seq:
            spec.data.max_seq_len = seq
        prepared = data.prepare(spec.data, tok)
        batches = data.train_batches(prepared, spec.data, batch, 0, 0)
        parts = build_parts(peft_model, spec.train, 100, dtype)
        old = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        times, cpus, tokens = [], [], 0
        try:
            ctx = _fused(peft_model, dtype) if fused else _null()
            with ctx:
                for i in range(steps):
                    b = batches[i % len(batches)]
                    tick, cpu = time.perf_counter(), time.process_time()
                    one_step(parts, [b], spec.train, i + 1, tok.pad_token_id)
                    times.append(time.perf_counter() - tick)
                    cpus.append(time.process_time() - cpu)
                    tokens += int((b["input_ids"] != tok.pad_token_id).sum())
        finally:
            torch.set_num_threads(old)
            peft_model.unload()  # the same base serves the next variant
        # The first step warms up (allocations, one-time casts); the rest are measured.
        kept, kept_cpu = (times[1:], cpus[1:]) if len(times) > 1 else (times, cpus)
        per_token = tokens / len(times)
        return {"median_step_s": round(statistics.median(kept), 3),
                "tokens_per_s": round(per_token * len(kept) / sum(kept), 1),
                # CPU seconds of this process: less swayed by other processes than wall time.
                "tokens_per_cpu_s": round(per_token * len(kept_cpu) / sum(kept_cpu), 1),
                "steps_s": [round(t, 3) for t in times], "steps_cpu_s": [round(t, 3) for t in cpus]}

    levers: List[Dict] = []

    def compare(name: str, a_label: str, a: Callable[[], Dict], b_label: str, b: Callable[[], Dict],
                metric: str = "tokens_per_s") -> None:
        if not wanted(name):
            return
        # a, b, a, b, ...: a machine whose load changes affects both alike; the median of each side.
        runs = [(a(), b()) for _ in range(rounds)]
        first, second = (_median_runs([r[i] for r in runs]) for i in (0, 1))
        for m in (metric, "tokens_per_cpu_s"):
            if m not in first:
                continue
            ratio = second[m] / first[m] if first[m] else float("nan")
            levers.append({"lever": name, "a": a_label, "b": b_label, "metric": m, "a_value": first[m],
                           "b_value": second[m], "b_over_a": round(ratio, 3), "a_detail": first,
                           "b_detail": second, "load": load()})
            print(f"{name}: {a_label} {first[m]} vs {b_label} {second[m]} {m} (x{ratio:.2f})", flush=True)

    def wanted(name: str) -> bool:
        return not only or any(word.lower() in name.lower() for word in only)

    cores = os.cpu_count() or 2
    compare("NF4 base: dequantized per forward vs kept (peft)", "per forward (bitsandbytes)",
            lambda: step_time(kept=False), "kept (quantization.cpu_dequantize)", lambda: step_time())
    compare("max_seq_len (4 packed rows)", "256", lambda: step_time(), "128", lambda: step_time(seq=128))
    compare("torch threads", f"{torch.get_num_threads()} threads (default)", lambda: step_time(),
            "1 thread", lambda: step_time(threads=1))
    compare("fused path (dropout 0.05)", "peft", lambda: step_time(), "fused", lambda: step_time(fused=True))
    compare("LoRA dropout (fused)", "0.05", lambda: step_time(fused=True), "0.0",
            lambda: step_time(dropout=0.0, fused=True))
    compare("LoRA dropout (peft)", "0.05", lambda: step_time(), "0.0", lambda: step_time(dropout=0.0))
    compare("tokens per step", "4 rows of 256", lambda: step_time(), "8 rows of 256", lambda: step_time(batch=8))
    compare("NF4 base vs unquantized (peft)", "nf4", lambda: step_time(), "none (fp32 base)",
            lambda: step_time(quant="none"))
    levers.append({"lever": "model load", **{f"{k}_s": round(v[3], 2) for k, v in loaded.items()}, "load": load()})
    if not any(wanted(n) for n in ("sample replies", "KV cache in generation", "base figures",
                                   "sample replies on the NF4 base", "eval pass (24 examples) on the NF4 base")):
        return {"kind": "levers", "job": str(JOB.relative_to(ROOT)), "overrides": overrides, "machine": machine(),
                "steps_per_variant": steps, "rounds": rounds, "torch_threads": torch.get_num_threads(),
                "cores": cores, "load_before": before, "load_after": load(), "levers": levers}
    model_for("nf4", 0.0)[0].unload()
    model_for("nf4", 0.0, kept=False)[0].unload()

    # Generation: the smoke job's prompts, one batch with the KV cache vs one prompt at a time, vs no cache.
    m, tok, dtype, _ = loaded["nf4"]
    prompts = evaluate.read_prompts(base_spec.eval)
    settings = base_spec.eval

    def gen(batch_size: int, cache: bool = True) -> Dict:
        m.config.use_cache = cache
        tick = time.perf_counter()
        import dataclasses

        if cache:
            evaluate.generate_replies(m, tok, prompts, dataclasses.replace(settings, batch_size=batch_size), dtype)
        else:
            real = evaluate._generate_kwargs
            evaluate._generate_kwargs = lambda *a: {**real(*a), "use_cache": False}
            try:
                evaluate.generate_replies(m, tok, prompts, dataclasses.replace(settings, batch_size=batch_size), dtype)
            finally:
                evaluate._generate_kwargs = real
        m.config.use_cache = False
        return {"s": round(time.perf_counter() - tick, 2), "prompts_per_s": round(len(prompts) / (time.perf_counter() - tick), 3)}

    compare("sample replies", "one prompt at a time", lambda: gen(1), f"{len(prompts)} prompts in one batch",
            lambda: gen(8), metric="prompts_per_s")
    compare("KV cache in generation", "off", lambda: gen(8, cache=False), "on", lambda: gen(8),
            metric="prompts_per_s")
    prepared = data.prepare(base_spec.data, tok)

    def gen_on(kind: str) -> Dict:
        nonlocal m
        m = loaded[kind][0]
        try:
            return gen(8)
        finally:
            m = loaded["nf4"][0]

    def eval_pass(kind: str) -> Dict:
        tick = time.perf_counter()
        evaluate.perplexity(loaded[kind][0], data.eval_batches(prepared, base_spec.eval.batch_size), dtype)
        return {"s": round(time.perf_counter() - tick, 2), "passes_per_s": round(1 / (time.perf_counter() - tick), 4)}

    compare("sample replies on the NF4 base", "per forward", lambda: gen_on("nf4 per forward"), "kept",
            lambda: gen_on("nf4"), metric="prompts_per_s")
    compare("eval pass (24 examples) on the NF4 base", "per forward", lambda: eval_pass("nf4 per forward"), "kept",
            lambda: eval_pass("nf4"), metric="passes_per_s")
    if not wanted("base figures"):
        return {"kind": "levers", "job": str(JOB.relative_to(ROOT)), "overrides": overrides, "machine": machine(),
                "steps_per_variant": steps, "rounds": rounds, "torch_threads": torch.get_num_threads(),
                "cores": cores, "load_before": before, "load_after": load(), "levers": levers}

    # The base figures: measured (perplexity + replies) vs taken from the cache.
    tick = time.perf_counter()
    evaluate.measure(m, tok, prepared, base_spec, dtype)
    measured = time.perf_counter() - tick
    key = base_key(base_spec, tok, prepared, "cpu")
    tick = time.perf_counter()
    lookup(key)
    looked = time.perf_counter() - tick
    levers.append({"lever": "base figures", "measure_s": round(measured, 2), "cache_lookup_s": round(looked, 4),
                   "load": load()})
    return {"kind": "levers", "job": str(JOB.relative_to(ROOT)), "overrides": overrides, "machine": machine(),
            "steps_per_variant": steps, "torch_threads": torch.get_num_threads(),
            "cores": cores, "load_before": before, "load_after": load(), "levers": levers}


@contextmanager
def _null():
    yield


# ---------------------------------------------------------------- submit: the 2-trial sweep

def run_submit(out: Path, overrides: List[str]) -> Dict:
    before = load()
    work = Path(tempfile.mkdtemp(prefix="cpu_first_submit_"))
    cmd = [sys.executable, "-m", "qlora_ray", "submit", str(JOB), "sweep={lora.r: [8, 16]}",
           f"output.dir={work / 'runs'}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    lines, tick = [], time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        lines.append((round(time.perf_counter() - tick, 2), line.rstrip()))
        print(f"[{lines[-1][0]:7.1f}s] {line.rstrip()}", flush=True)
    proc.wait()
    wall = time.perf_counter() - tick
    exp = work / "runs" / "hinglish_smoke"
    trials = {}
    for result in sorted(exp.glob("*/result.json")):
        raw = json.loads(result.read_text())
        timing = raw.get("timing") or {}
        final = raw.get("final") or {}
        trials[result.parent.name] = {"timing": timing, "train_s": final.get("train_s"), "wall_s": final.get("wall_s"),
                                      "ppl_change": final.get("ppl_change")}

    def first(text: str):
        return next((t for t, line in lines if text in line), None)

    marks = {"experiment folder printed (imports, spec)": first("experiment:"),
             "Ray up (dashboard/logs printed)": first("Ray logs") or first("Ray dashboard"),
             "base-model task announced": first("baseline:"),
             "base-model figures saved": first("baseline: done") or first("baseline: saved"),
             "leaderboard printed": first("leaderboard") or first("rank")}
    starts = [t["timing"].get("worker_entered") for t in trials.values() if t["timing"]]
    fits = [(t["timing"].get("fit_started"), t["timing"].get("fit_ended")) for t in trials.values() if t["timing"]]
    overlap = None
    if len(fits) == 2 and all(all(f) for f in fits):
        (a0, a1), (b0, b1) = fits
        overlap = round(max(0.0, min(a1, b1) - max(a0, b0)), 1)
    return {"kind": "submit", "command": " ".join(cmd[2:]), "exit_status": proc.returncode, "wall_s": round(wall, 2),
            "marks_s": marks, "trials": trials, "trials_overlap_s": overlap, "machine": machine(),
            "load_before": before, "load_after": load(), "output_tail": [f"{t}s {l}" for t, l in lines[-40:]],
            "worker_entered": starts}


# ---------------------------------------------------------------- output

def markdown(report: Dict) -> str:
    lines = [f"# cpu_first_run: {report['kind']}", "",
             f"Machine: {report['machine']['cpus']} CPUs ({report['machine']['platform']}); load average "
             f"(1, 5, 15 min) before {report['load_before']}, after {report['load_after']}.", ""]
    if report["kind"] == "train":
        for run, r in report["runs"].items():
            lines += [f"## {run} run: fit {r['fit_wall_s']} s, base ppl {r['base_ppl']:.2f} -> tuned "
                      f"{r['tuned_ppl']:.2f} ({r['ppl_change']:+.1%}), torch threads {r['torch_threads']}", "",
                      "| phase | seconds |", "| --- | ---: |"]
            lines += [f"| {k} | {v:.2f} |" for k, v in r["phases_s"].items()]
            lines += ["", f"Steps (s): {', '.join(f'{s:.2f}' for s in r['step_s'])}", ""]
    elif report["kind"] == "levers":
        lines += [f"{report['steps_per_variant']} steps per variant (the first is warm-up); ratios are b / a "
                  "within one process run.", "", "| lever | a | b | metric | a | b | b / a | load after |",
                  "| --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
        for lv in report["levers"]:
            if "b_over_a" in lv:
                lines.append(f"| {lv['lever']} | {lv['a']} | {lv['b']} | {lv['metric']} | {lv['a_value']} | "
                             f"{lv['b_value']} | {lv['b_over_a']} | {lv['load']} |")
            else:
                rest = ", ".join(f"{k} {v}" for k, v in lv.items() if k not in ("lever", "load"))
                lines.append(f"| {lv['lever']} | {rest} | | | | | | {lv['load']} |")
    else:
        lines += [f"`{report['command']}`: exit {report['exit_status']}, wall {report['wall_s']} s; "
                  f"trials overlapped {report['trials_overlap_s']} s.", "", "| mark | seconds from start |",
                  "| --- | ---: |"]
        lines += [f"| {k} | {v} |" for k, v in report["marks_s"].items()]
        lines += ["", "| trial | train s | wall s (fit) | ppl change |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {k} | {v['train_s']} | {v['wall_s']} | {v['ppl_change']} |" for k, v in report["trials"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("train", "levers", "submit"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_first_run")
    parser.add_argument("--steps", type=int, default=3, help="levers: train steps per variant")
    parser.add_argument("--only", default="", help="levers: comma-separated words; only levers whose name holds one")
    parser.add_argument("--rounds", type=int, default=1, help="levers: a/b alternations per lever (medians)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 makes CPU "
                        "seconds per token a fair a/b measure on a machine busy with other work")
    parser.add_argument("overrides", nargs="*", help="spec overrides (KEY=VALUE), e.g. model.name=DIR for "
                        "a stand-in model of the same shape")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.kind == "train":
        report = run_train(args.out, args.overrides)
    elif args.kind == "levers":
        report = run_levers(args.out, args.steps, args.overrides, [w for w in args.only.split(",") if w],
                            args.rounds)
    else:
        report = run_submit(args.out, args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.kind}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (args.out / f"{args.kind}.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))


if __name__ == "__main__":
    main()
