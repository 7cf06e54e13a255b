"""The training of one trial as a trainer object: ``setup`` (load, quantize, add LoRA, resume),
``train`` (steps, metric rows, checkpoints) and ``finish`` (adapter, evaluation, final figures).

Trial folder (``run.trial_dir``)::

    resolved_spec.yaml   metrics.jsonl   result.json   baseline.json   samples.md
    adapter/                     peft adapter (safetensors) + tokenizer + qlora_ray_spec.yaml
    checkpoints/step_<N>/        see ``train.checkpoint``
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from qlora_ray import data, layout
from qlora_ray.base_cache import base_key, cached
from qlora_ray.budget import TIME_BUDGET
from qlora_ray.errors import UserError, disk_full_as
from qlora_ray.evaluate import describe_decoding, measure, write_samples
from qlora_ray.files import write_text
from qlora_ray.model import (add_lora, device_of, gradient_checkpointing_on, keeps_dequantized, load_base,
                             lora_folded_in, save_adapter)
from qlora_ray.records import Baseline, FinalMetrics, StepMetrics, TrialResult, to_line
from qlora_ray.resume import check_resume
from qlora_ray.spec import JobSpec, to_yaml
from qlora_ray.train import checkpoint as ckpt
from qlora_ray.train import fused
from qlora_ray.train.memory import peak_memory_gb, reset_peak_memory, sync
from qlora_ray.train.optim import build_parts
from qlora_ray.train.periodic import PeriodicEval
from qlora_ray.train.step import step_with_fallback

log = logging.getLogger(__name__)

# ``report(metrics, checkpoint_dir)``: a logged step's figures (``StepMetrics`` fields) and the
# checkpoint written at that step, if any. Ray passes a wrapper of ``ray.train.report``.
Report = Callable[[Dict, Optional[str]], None]
# A finished trial's figures: the same record ``result.json`` holds.
FitResult = FinalMetrics


@dataclass
class RunContext:
    """Where and how one trial runs (filled by the runtime or ``qlora-ray train``)."""

    trial_dir: str
    resume_from: Optional[str] = None   # a checkpoint folder (checkpoints/step_<N>)
    baseline: Optional[Baseline] = None  # base-model figures; measured here when None
    # Base figures measured elsewhere at the same time as this trial (the runtime's base-model
    # task): asked for once training is done; when it returns None (not ready, or failed) this
    # trial measures the base model itself, with its adapter switched off.
    base_figures: Optional[Callable[[], Optional[Baseline]]] = None
    progress: bool = False               # a progress bar on stderr
    # Share of the GPU's memory this process may take (several trials on one GPU): beyond it
    # a step runs out of memory here instead of starving its neighbours.
    gpu_memory_fraction: Optional[float] = None
    # Asked after each step with the seconds one more step plus one checkpoint take (as measured
    # here): True means the time is up, so the trial checkpoints and raises :class:`Stopped`.
    should_stop: Optional[Callable[[float], bool]] = None


class Stopped(Exception):
    """Training stopped early at a checkpoint it just saved (``str``: why); a resume continues it."""


def fit(spec: JobSpec, report: Report, run: RunContext) -> FitResult:
    """Train one trial of ``spec`` into ``run.trial_dir``; its final figures (also in ``result.json``)."""
    trainer = Trainer(spec, report, run)
    trainer.setup()
    trainer.train()
    return trainer.finish()


class Trainer:
    """One trial's training; its state lives here between ``setup``, ``train`` and ``finish``."""

    def __init__(self, spec: JobSpec, report: Report, run: RunContext):
        self.spec, self.report, self.run = spec, report, run
        self.trial_dir = Path(run.trial_dir)
        self.say = _say if run.progress else (lambda message: None)
        self.started = time.time()
        self.state = ckpt.TrainState()
        self.baseline = run.baseline
        self.epoch_len = 1
        self.step_s = 0.0                          # the slowest step so far
        self.checkpoint_s: Optional[float] = None  # the slowest checkpoint save so far

    # ------------------------------------------------------------ setup
    def setup(self) -> None:
        """Load and quantize the base, add LoRA, build the optimizer; resume from a checkpoint."""
        spec, t = self.spec, self.spec.train
        reset_peak_memory()
        self.trial_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = ckpt.find_checkpoint(self.run.resume_from, self.trial_dir)
        if checkpoint is not None:
            # Before anything is written: a refused resume leaves the trial folder as it was.
            check_resume(checkpoint, spec, layout.CHECKPOINT_SPEC_FILE, self.trial_dir / layout.RESOLVED_SPEC_FILE)
        self.spec_yaml = to_yaml(spec)
        write_text(self.trial_dir / layout.RESOLVED_SPEC_FILE, self.spec_yaml)
        ckpt.seed_everything(t.seed)
        self.say(f"loading {spec.model.name} ({spec.quantization.mode}) and the data ...")
        base, self.tokenizer, dtype, _ = load_base(spec)
        if keeps_dequantized(spec, device_of(base)):
            self.say(f"the {spec.quantization.mode} base is dequantized once and kept on the CPU "
                     "(quantization.cpu_dequantize; the same values as per-forward dequantizing)")
        self.prepared = data.prepare(spec.data, self.tokenizer)
        ckpt.seed_everything(t.seed)
        model = add_lora(base, spec)
        self.device = device_of(model)
        if self.device.type == "cuda" and self.run.gpu_memory_fraction:
            torch.cuda.set_per_process_memory_fraction(self.run.gpu_memory_fraction, self.device)
        self.model, self.dtype = model, dtype
        if self.baseline is None and self.run.base_figures is None:
            self.say(f"measuring the base model on {len(self.prepared.eval)} eval examples ...")
            self.baseline = self._measure_base(reuse=checkpoint is not None)
        steps_per_epoch = math.ceil(len(data.train_batches(self.prepared, spec.data, t.batch_size, 0, t.seed))
                                    / t.grad_accum)
        self.total = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
        self.fused = fused.choose(model, spec, dtype, self.say)
        self.parts = build_parts(model, t, self.total, dtype)
        self.periodic = PeriodicEval(spec.eval, self.prepared, self.total)
        if checkpoint is not None:
            self.state = ckpt.restore(checkpoint, self.parts)
            log.info("resumed from %s (step %d)", checkpoint, self.state.step)
        ckpt.forget_after(self.trial_dir, self.state.step)
        (self.trial_dir / layout.RESULT_FILE).unlink(missing_ok=True)  # an earlier run's outcome
        self.prior_wall = self.state.wall_s

    def _measure_base(self, reuse: bool) -> Baseline:
        """Base-model figures: from the base-figure cache, else measured on the model in hand
        (adapters switched off); saved in the trial folder for resumes."""
        path = self.trial_dir / layout.BASELINE_FILE
        if reuse and path.is_file():
            return Baseline.from_json(path.read_text(encoding="utf-8"))

        def measure_now() -> Baseline:
            with self.model.disable_adapter():
                return measure(self.model, self.tokenizer, self.prepared, self.spec, self.dtype)

        baseline = cached(base_key(self.spec, self.tokenizer, self.prepared, self.device), measure_now)
        path.write_text(baseline.to_json(), encoding="utf-8")
        return baseline

    def _wall(self) -> float:
        return self.prior_wall + time.time() - self.started

    # ------------------------------------------------------------ train
    def train(self) -> None:
        """Optimizer steps up to the total; a metric row every ``log_every``, a checkpoint every
        ``checkpoint_every`` and at the end."""
        t, state = self.spec.train, self.state
        self.bar = _progress(self.run.progress, self.total, state.step, self.spec.name)
        self.parts.model.train()
        # The fused forwards (train.fused) only while stepping: saving and evaluation run peft's own.
        with self.fused():
            while state.step < self.total:
                batches = data.train_batches(self.prepared, self.spec.data, t.batch_size, state.epoch, t.seed)
                self.epoch_len = len(batches)
                if self.epoch_len == 0:
                    raise UserError("data.train: no training batches (is the training set empty?)")
                while state.batch < self.epoch_len and state.step < self.total:
                    self._one_step(batches)
        self.bar.close()

    def _one_step(self, batches) -> None:
        t, state = self.spec.train, self.state
        tick = time.perf_counter()
        group = [batches[j] for j in range(state.batch, min(state.batch + t.grad_accum, self.epoch_len))]
        lr = self.parts.scheduler.get_last_lr()[0]
        done = step_with_fallback(self.parts, group, t, state.step + 1, self.tokenizer.pad_token_id, self.say)
        sync(self.device)
        elapsed = time.perf_counter() - tick
        state.step += 1
        state.batch += len(group)
        state.tokens += done.tokens
        state.train_s += elapsed
        for key, value in (("loss", done.loss_sum), ("targets", done.targets), ("tokens", done.tokens),
                           ("s", elapsed)):
            state.window[key] += value
        if state.batch >= self.epoch_len:
            state.epoch, state.batch = state.epoch + 1, 0
        self.bar.update(1)
        self.step_s = max(self.step_s, elapsed)
        out_of_time = state.step < self.total and self._out_of_time()
        evaluate = self.periodic.due(state.step)
        # An eval step checkpoints too: a trial a scheduler stops there keeps a checkpoint that
        # matches its last eval figure.
        save = out_of_time or state.step % t.checkpoint_every == 0 or state.step == self.total or evaluate
        if save or state.step % t.log_every == 0:
            self._log(lr, save, evaluate)
        if out_of_time:
            raise Stopped(TIME_BUDGET)

    def _out_of_time(self) -> bool:
        # A checkpoint not yet timed counts as one more step.
        margin = self.step_s + (self.checkpoint_s if self.checkpoint_s is not None else self.step_s)
        return self.run.should_stop is not None and self.run.should_stop(margin)

    def _log(self, lr: float, save: bool, evaluate: bool = False) -> None:
        # The row (which resets the running window) comes before the checkpoint, so a resumed
        # run continues with exactly the window an uninterrupted one has.
        row = self._row(lr)
        self.state.last_loss = row.loss
        if evaluate:
            row.eval_ppl = self.periodic.measure(self.parts.model, self.parts.compute_dtype)
            self._keep_adapter(row)
        ckpt_dir = None
        if save:
            self.state.wall_s = self._wall()
            tick = time.perf_counter()
            ckpt_dir = str(ckpt.save_checkpoint(self.trial_dir, self.state, self.parts, self.spec_yaml))
            self.checkpoint_s = max(self.checkpoint_s or 0.0, time.perf_counter() - tick)
        self.bar.set_postfix(loss=f"{row.loss:.4f}", tok_s=f"{row.tokens_per_s:.0f}")
        with disk_full_as(f"the step-{row.step} row of {layout.METRICS_FILE}", self.trial_dir), \
                open(self.trial_dir / layout.METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(to_line(row))
        self.report(row.fields(), ckpt_dir)

    def _row(self, lr: float) -> StepMetrics:
        state, w = self.state, self.state.window
        row = StepMetrics(step=state.step, total_steps=self.total, epoch=self._epoch(),
                          loss=w["loss"] / w["targets"] if w["targets"] else float("nan"),
                          lr=lr, tokens_per_s=w["tokens"] / w["s"] if w["s"] else 0.0,
                          peak_mem_gb=peak_memory_gb(self.device), train_s=state.train_s, tokens=state.tokens)
        state.window = {"loss": 0.0, "targets": 0, "tokens": 0, "s": 0.0}
        return row

    def _keep_adapter(self, row: StepMetrics) -> None:
        """adapter/ after a periodic eval: this step's (keep last) or, on a new lowest eval
        perplexity, this step's (keep best). Saved now, not only at the end: a scheduler may stop
        the trial before it finishes."""
        state = self.state
        better = row.eval_ppl is not None and (state.best_eval_ppl is None or row.eval_ppl < state.best_eval_ppl)
        if better:
            state.best_eval_ppl, state.best_step = row.eval_ppl, row.step
        if better or self.spec.eval.keep == "last":
            save_adapter(self.parts.model, self.tokenizer, self.spec, self.trial_dir / layout.ADAPTER_DIR)

    def _epoch(self) -> float:
        return round(self.state.epoch + self.state.batch / max(1, self.epoch_len), 4)

    # ------------------------------------------------------------ finish
    def finish(self) -> FitResult:
        """Save the adapter, measure base (if not yet) and tuned model, write ``result.json``."""
        model, spec, state = self.parts.model, self.spec, self.state
        best = spec.eval.keep == "best" and state.best_step is not None
        if best:
            # The final figures and samples are the kept adapter's: its weights back into the model.
            adapter_dir = ckpt.load_adapter_weights(model, self.trial_dir / layout.ADAPTER_DIR)
        else:
            with disk_full_as("the final adapter", self.trial_dir / layout.ADAPTER_DIR):
                adapter_dir = save_adapter(model, self.tokenizer, spec, self.trial_dir / layout.ADAPTER_DIR)
        baseline = self.baseline
        if baseline is None:
            baseline = self.run.base_figures() if self.run.base_figures else None
        if baseline is None:
            self.say("measuring the base model (adapter off) ...")
            baseline = self._measure_base(reuse=True)
        self.say("measuring the tuned model ...")
        with lora_folded_in(model):
            tuned = measure(model, self.tokenizer, self.prepared, spec, self.parts.compute_dtype)
        samples = None
        if tuned.prompts:
            with disk_full_as(layout.SAMPLES_FILE, self.trial_dir):
                samples = str(write_samples(self.trial_dir / layout.SAMPLES_FILE, tuned.prompts, baseline.replies,
                                            tuned.replies, describe_decoding(spec.eval)))
        base_ppl, eval_ppl = baseline.perplexity, tuned.perplexity
        extra = self._side_figures(eval_ppl)
        result = FitResult(
            step=state.step, total_steps=self.total, train_loss=state.last_loss, eval_ppl=eval_ppl,
            base_ppl=base_ppl, ppl_change=(eval_ppl / base_ppl - 1.0) if eval_ppl and base_ppl else None,
            eval_tokens=tuned.target_tokens, tokens_per_s=state.tokens / state.train_s if state.train_s else 0.0,
            peak_mem_gb=peak_memory_gb(self.device), wall_s=self._wall(), train_s=state.train_s,
            adapter_dir=str(adapter_dir), samples_file=samples,
            gradient_checkpointing=gradient_checkpointing_on(model), epoch=self._epoch(),
            best_step=state.best_step if best else None, **extra)
        with disk_full_as(layout.RESULT_FILE, self.trial_dir):
            write_text(self.trial_dir / layout.RESULT_FILE, TrialResult(final=result).to_json() + "\n")
        return result

    def _side_figures(self, eval_ppl: Optional[float]) -> Dict:
        """The control set (base vs tuned) and the unquantized base: FinalMetrics fields."""
        from qlora_ray import sets

        out: Dict = {}
        if self.spec.eval.control:
            self.say("measuring base and tuned model on the control set ...")
            c = sets.measure_control(self.parts.model, self.tokenizer, self.spec, self.parts.compute_dtype,
                                     self.device)
            out.update(control_base_ppl=c.base_ppl, control_ppl=c.tuned_ppl, control_change=c.change,
                       control_tokens=c.tokens)
        if sets.measures_quantization_cost(self.spec):
            self.say("measuring the unquantized base model (once per base and eval set) ...")
            full = sets.unquantized_base(self.spec, self.tokenizer, self.prepared, self.device)
            out["base_ppl_unquantized"] = full
            if full and eval_ppl:
                out["change_vs_unquantized"] = eval_ppl / full - 1.0
        return out


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def _progress(enabled: bool, total: int, initial: int, name: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"train {name}", unit="step", dynamic_ncols=True)
