"""What every side of the throughput benchmark shares, importing nothing but torch: the task
files, the memory cap, the held-out loss, one rule for turning step times into tokens/s, and
the worker loop.

A side runs in its own process (``hf_recipe.py``, ``qlora_side.py``, ``unsloth_side.py``), reads
the task from ``WORK/task.json``, ``WORK/train.json`` and ``WORK/eval.json`` (token id rows) and
the model from ``WORK/model``. With ``--serve`` it stays up as a worker: it imports (and
compiles) once, then runs whenever ``throughput.py`` asks on stdin (one JSON line a run:
``{"out": path, "max_steps": n}``) and answers ``@@done ok|error`` on stdout; every run loads a
fresh model, so runs of one side are independent, and the sides' runs can alternate.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
import argparse
from pathlib import Path
from typing import Callable, List, Optional

import torch

CAP_GIB = 15.0  # a T4's usable memory: every side runs under it, whatever GPU runs the benchmark


@dataclass
class Task:
    """The training job every side runs: the same rows, learning rate and warm-up share."""

    lr: float = 2e-4
    warm_share: float = 0.1  # of the run's target tokens, left out of tokens/s on every side
    cap_gib: float = CAP_GIB
    max_seq_len: int = 512
    lora_r: int = 16
    seed: int = 42

    @classmethod
    def read(cls, work: Path) -> "Task":
        return cls(**json.loads((work / "task.json").read_text()))


@dataclass
class SideResult:
    side: str
    tokens_per_s: float
    peak_gib: float
    eval_loss: Optional[float]
    final_loss: Optional[float]
    steps: int
    timed_steps: int
    target_tokens: int
    batch: Optional[int] = None
    train_s: float = 0.0
    process_s: float = 0.0
    gpu: str = ""
    notes: dict = field(default_factory=dict)


def rows(work: Path, name: str) -> List[List[int]]:
    return json.loads((work / f"{name}.json").read_text())


def cap_memory(cap_gib: float) -> float:
    """Cap this process's CUDA memory at ``cap_gib`` of whatever GPU it runs on; the fraction."""
    if not torch.cuda.is_available():
        return 1.0
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, cap_gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return fraction


def timed_rate(step_tokens: List[int], step_times: List[float], warm_share: float) -> tuple:
    """``(tokens/s, timed steps)`` leaving out the first steps that hold ``warm_share`` of the tokens."""
    total = sum(step_tokens)
    seen, skip = 0, 0
    for tokens in step_tokens:
        if seen >= warm_share * total:
            break
        seen += tokens
        skip += 1
    skip = min(skip, len(step_tokens) - 1)
    timed_tokens, timed_s = sum(step_tokens[skip:]), sum(step_times[skip:])
    return timed_tokens / max(timed_s, 1e-9), len(step_tokens) - skip


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Clock:
    """Step timer: ``start()`` with the batch in hand, ``stop(tokens)`` after the optimizer step."""

    def __init__(self):
        self.times: List[float] = []
        self.tokens: List[int] = []
        self._t = 0.0

    def start(self) -> None:
        sync()
        self._t = time.perf_counter()

    def stop(self, tokens: Optional[int] = None) -> None:
        sync()
        self.times.append(time.perf_counter() - self._t)
        if tokens is not None:
            self.tokens.append(tokens)


@torch.no_grad()
def heldout_loss(model, rows_: List[List[int]], pad_id: int, dtype=torch.float16, batch: int = 8) -> float:
    """Mean next-token loss over every token of the held-out rows (right-padded batches of 8),
    through the model's own ``labels`` loss: the same function for every side."""
    was = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    total, count = 0.0, 0
    try:
        for i in range(0, len(rows_), batch):
            chunk = rows_[i:i + batch]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, r in enumerate(chunk):
                ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), 1
            labels = ids.masked_fill(mask == 0, -100)
            n = int((labels[:, 1:] != -100).sum())
            ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
            total += float(loss) * n
            count += n
    finally:
        model.train(was)
    return total / count if count else math.nan


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else math.nan


def gpu_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def write(result: SideResult, out: Path) -> None:
    out.write_text(json.dumps(asdict(result), indent=1))
    print(json.dumps(asdict(result)), flush=True)


DONE = "@@done"
READY = "@@ready"


def serve(run_once: Callable[[dict], SideResult]) -> None:
    """The worker loop: one run per JSON line on stdin, ``@@done ok|error`` after each."""
    print(READY, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        status = "ok"
        try:
            result = run_once(command)
            if command.get("out"):
                write(result, Path(command["out"]))
        except Exception:  # the worker stays up; the orchestrator records the failed run
            traceback.print_exc()
            status = "error"
        free()
        print(f"{DONE} {status}", flush=True)


def free() -> None:
    """Give back what a finished run held, and start a new memory peak."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def serve_or_run(run_once, args) -> None:
    """A side's entry: answer the orchestrator's requests (``--serve``) or run once into ``--out``."""
    if args.serve:
        serve(run_once)
    else:
        write(run_once({}), args.out)


def side_parser(doc: str) -> argparse.ArgumentParser:
    """The options every side takes: its work folder, and run once (``--out``) or ``--serve``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="Run once into this file (else --serve).")
    parser.add_argument("--serve", action="store_true", help="Stay up and run on request (see sides.py).")
    return parser
