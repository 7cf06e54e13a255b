"""Throughput benchmark: qlora-ray against the tuned Hugging Face recipe and Unsloth, side by side.

Every side trains the same TinyLlama-1.1B-shaped model (random init; NF4 + double quant, fp16
compute as on a T4, LoRA r16 on all linear layers, paged 8-bit AdamW, the same learning rate and
cosine schedule) for one epoch over the same examples, each run in a process of its own, capped
at 15 GiB of whatever GPU runs it. The examples have chat-like lengths (lognormal, median 180,
16 to 512 tokens) walked on a fixed random bigram chain over ``--states`` token ids (each with 4
successors), so the held-out loss falls from ln 32000 = 10.4 towards ln 4 = 1.39 as a model
learns, and "eval loss no worse" catches a wrong gradient. Every side is measured the same way:
trained target tokens over the summed time of its optimizer steps (batch in hand to optimizer
step done, with a device sync), leaving out the steps that hold the first ``warm_share`` of the
tokens; then the mean loss over the same 64 held-out rows through the model's own ``labels`` loss.

Sides (``--sides``):
  hf-b8      HF Trainer, 8 rows a step in random order, checkpointing (the naive recipe; with
             ``--b8-steps`` it stops after that many steps, and its loss is after fewer tokens)
  hf-tuned   HF Trainer, length-grouped batches, the largest batch of 8/16/32/48/64 that fits
  unsloth    Unsloth at the largest batch of ``--unsloth-batches`` that fits (``unsloth_side.py``)
  qlora      qlora-ray at its defaults (packed rows of 512, 8 a step, peft path)
  fused      qlora-ray at its defaults with the fused path (``qlora_ray.kernels.fuse``)
  fused-bN / fused-nogc / fused-offload / fused-compile   the fused path with N rows a step / no
             checkpointing / checkpointing offloaded to host memory / torch.compile'd elementwise
             (parts combine: fused-b16-nogc)

    python benchmarks/throughput.py --out DIR [--rounds 3] [--sides hf-tuned,unsloth,qlora,fused]
        [--budget-s 540] [--profile fused]

Each side is a worker process (see ``sides.py``), started one after another before the first
round and given a short untimed warm-up run, where imports, compilation and the batch search
of hf-tuned and unsloth happen; then the rounds alternate the sides (each round starts one
later in the list), every run on a freshly loaded model, one run on the GPU at a time.
``DIR/fair.json`` holds every run (rewritten after each), ``DIR/fair.md`` the medians, ranges
and ratios, ``DIR/logs/SIDE.log`` each worker's output. ``--smoke`` checks the harness on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_model import SPECIALS, VOCAB  # noqa: E402
import sides  # noqa: E402

SUCCESSORS = 4

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


def side_command(name: str, work: Path, args) -> list:
    """The command line that starts side ``name`` as a worker."""
    py = [sys.executable]
    common = ["--work", str(work), "--serve"] + (["--cpu"] if args.smoke else [])
    if name == "hf-b8":
        return py + [str(HERE / "hf_recipe.py"), "--batch", "8", "--max-steps", str(args.b8_steps)] + common
    if name == "hf-tuned":
        return py + [str(HERE / "hf_recipe.py"), "--tuned"] + common
    if name == "unsloth":
        return py + [str(HERE / "unsloth_side.py"), "--batches", args.unsloth_batches] + common
    side = py + [str(HERE / "qlora_side.py"), "--name", name] + common
    if name == "qlora":
        return side
    if not name.startswith("fused"):
        raise SystemExit(f"unknown side {name}")
    side.append("--fused")
    for part in name.split("-")[1:]:
        if part.startswith("b") and part[1:].isdigit():
            side += ["--batch-size", part[1:]]
        elif part in ("nogc", "offload", "compile"):
            side += {"nogc": ["--checkpointing", "false"], "offload": ["--offload"], "compile": ["--compile"]}[part]
        else:
            raise SystemExit(f"unknown fused variant {part!r} in {name}")
    if args.profile and name == args.profile:
        side += ["--profile", str(args.out / f"profile_{name}.md")]
    return side


def prepare(work: Path, args) -> None:
    """The model (in its own process, so this one never holds the GPU), the rows and the task."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model" / "config.json").is_file():
        code = ("import sys; sys.path.insert(0, %r); from make_model import make; from pathlib import Path; "
                "make(Path(%r), smoke=%r)" % (str(HERE), str(work / "model"), args.smoke))
        subprocess.run([sys.executable, "-c", code], check=True)
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(work / "model").eos_token_id
    vocab, longest = len(SPECIALS) + args.states, 64 if args.smoke else 512
    train = chain_rows(chat_lengths(args.examples, longest=longest), eos, seed=0, vocab=vocab)
    held = chain_rows(chat_lengths(64, seed=1, longest=longest), eos, seed=1, vocab=vocab)
    for name, rows in (("train", train), ("eval", held)):
        (work / f"{name}.json").write_text(json.dumps(rows))
        write_text_rows(work / f"{name}.jsonl", rows)
    task = sides.Task(lr=args.lr, warm_share=args.warm_share, max_seq_len=64 if args.smoke else 512)
    (work / "task.json").write_text(json.dumps(asdict(task)))


class Worker:
    """One side's process: started once, then asked for one run at a time (see sides.serve)."""

    def __init__(self, name: str, command: list, log: Path):
        self.name = name
        self.log = open(log, "w", buffering=1)
        self.events: "queue.Queue[str]" = queue.Queue()
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            if line.startswith("@@"):
                self.events.put(line.strip())
        self.events.put("@@eof")

    def wait(self, timeout: float) -> str:
        """The next ``@@`` line: ``@@ready``, ``@@done ok|error``, ``@@eof``, or ``timeout``."""
        try:
            return self.events.get(timeout=max(1.0, timeout))
        except queue.Empty:
            return "timeout"

    def run(self, command: dict, timeout: float) -> str:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait()
        self.log.close()


def start_workers(names: list, work: Path, args, clock) -> dict:
    """Start every side one after another and give each a short untimed warm-up run (imports,
    compilation, and the batch search of hf-tuned and unsloth happen here, not in a timed run)."""
    workers = {}
    for name in names:
        began = time.time()
        worker = Worker(name, side_command(name, work, args), args.out / "logs" / f"{name}.log")
        workers[name] = worker
        state = worker.wait(clock.left(args.start_timeout))
        if state == "@@ready":
            state = worker.run({"warm": True, "max_steps": args.warm_steps}, clock.left(args.start_timeout))
        print(f"start {name:14s} {state:12s} {time.time() - began:5.0f} s", flush=True)
        if state != "@@done ok":
            worker.close()
            del workers[name]
    return workers


def run_side(worker: Worker, round_: int, clock, args) -> dict:
    out = args.out / f"{worker.name}_r{round_}.json"
    started = time.time()
    state = worker.run({"out": str(out)}, clock.left(args.side_timeout))
    wall = time.time() - started
    if state != "@@done ok" or not out.is_file():
        print(f"round {round_} {worker.name}: {state} after {wall:.0f} s (see logs/{worker.name}.log)", flush=True)
        return {"side": worker.name, "round": round_, "rc": 1, "state": state, "wall_s": wall}
    result = json.loads(out.read_text())
    result.update(round=round_, rc=0, wall_s=wall)
    loss = "n/a" if result["eval_loss"] is None else f"{result['eval_loss']:.3f}"
    print(f"round {round_} {worker.name:14s} {result['tokens_per_s']:9.0f} tok/s  peak {result['peak_gib']:.2f} GiB  "
          f"eval {loss}  batch {result['batch']}  steps {result['steps']}  wall {wall:.0f} s", flush=True)
    return result


class Budget:
    def __init__(self, seconds: float):
        self.end = time.time() + seconds

    def left(self, cap: float) -> float:
        return min(cap, self.end - time.time())


def summarize(runs: list, names: list) -> tuple:
    """Per side: median and range of tokens/s, peak memory, eval loss; and the headline ratios."""
    table = {}
    for name in names:
        ok = [r for r in runs if r["side"] == name and r.get("rc") == 0 and "tokens_per_s" in r]
        if not ok:
            continue
        rates = [r["tokens_per_s"] for r in ok]
        losses = [r["eval_loss"] for r in ok if r.get("eval_loss") is not None]
        table[name] = dict(runs=len(ok), median=statistics.median(rates), low=min(rates), high=max(rates),
                           peak_gib=max(r["peak_gib"] for r in ok), batch=ok[0]["batch"],
                           eval_loss=statistics.median(losses) if losses else None,
                           target_tokens=ok[0]["target_tokens"], steps=ok[0]["steps"])
    ratios = {}
    for ours in ("fused", "qlora"):
        for other in ("unsloth", "hf-tuned", "hf-b8"):
            if ours in table and other in table:
                ratios[f"{ours} / {other}"] = table[ours]["median"] / table[other]["median"]
    return table, ratios


def markdown(table: dict, ratios: dict, env: dict) -> str:
    lines = [f"{env['gpu']}, cap {env['cap_gib']} GiB, {env['examples']} examples, chain over {env['states']} ids, "
             f"lr {env['lr']}, {env['date']}", "",
             "| side | runs | tokens/s median | range | batch | peak GiB | held-out loss | steps |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, t in table.items():
        loss = "n/a" if t["eval_loss"] is None else f"{t['eval_loss']:.3f}"
        batch = f"{t['batch']} tokens" if name.startswith(("qlora", "fused")) else f"{t['batch']} rows"
        lines.append(f"| {name} | {t['runs']} | {t['median']:,.0f} | {t['low']:,.0f}-{t['high']:,.0f} | {batch} | "
                     f"{t['peak_gib']:.2f} | {loss} | {t['steps']} |")
    lines.append("")
    names = {"fused": "qlora-ray", "qlora": "qlora-ray (peft path)", "unsloth": "Unsloth", "hf-tuned": "tuned HF",
             "hf-b8": "HF batch 8"}
    lines += [f"{names[a.split(' / ')[0]]} / {names[a.split(' / ')[1]]}: {v:.2f}x" for a, v in ratios.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None, help="Model and data folder (made if missing).")
    parser.add_argument("--sides", default="hf-tuned,unsloth,qlora,fused")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=1600)
    parser.add_argument("--states", type=int, default=256, help="Token ids the bigram chain walks over.")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warm-share", type=float, default=0.1)
    parser.add_argument("--warm-steps", type=int, default=3, help="Steps of each side's untimed warm-up run.")
    parser.add_argument("--b8-steps", type=int, default=-1, help="Stop hf-b8 after this many steps (-1: one epoch).")
    parser.add_argument("--unsloth-batches", default="128,64,32")
    parser.add_argument("--profile", default=None, help="A fused/qlora side to profile (a middle step of its first run).")
    parser.add_argument("--budget-s", type=float, default=1e9, help="Stop everything after this many seconds.")
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--side-timeout", type=float, default=300)
    parser.add_argument("--smoke", action="store_true", help="Check the harness on a CPU (tiny model).")
    args = parser.parse_args()
    clock = Budget(args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="qlora-fair-"))
    prepare(work, args)
    names = args.sides.split(",")
    env = dict(gpu=_gpu(), cap_gib=sides.CAP_GIB, examples=args.examples, states=args.states, lr=args.lr,
               warm_share=args.warm_share, date=time.strftime("%Y-%m-%d %H:%M"), rounds=args.rounds)
    print(json.dumps(env), flush=True)
    workers: dict = {}
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # runs the finally below
    runs = []
    try:
        workers = start_workers(names, work, args, clock)
        for round_ in range(1, args.rounds + 1):
            order = [n for n in names if n in workers]
            shift = (round_ - 1) % max(1, len(order))
            for name in order[shift:] + order[:shift]:
                if clock.left(1e9) < 10:
                    print(f"budget spent: round {round_} {name} not run", flush=True)
                    continue
                runs.append(run_side(workers[name], round_, clock, args))
                table, ratios = summarize(runs, names)
                (args.out / "fair.json").write_text(json.dumps(dict(env=env, runs=runs, table=table, ratios=ratios),
                                                               indent=1))
    finally:
        for worker in workers.values():
            worker.close()
    table, ratios = summarize(runs, names)
    (args.out / "fair.md").write_text(markdown(table, ratios, env))
    print(markdown(table, ratios, env), flush=True)


def _gpu() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "cpu"
    except (OSError, subprocess.SubprocessError):
        return "cpu"

if __name__ == "__main__":
    main()
