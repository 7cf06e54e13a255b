"""The sections that say how a trial trains and what it measures: ``train`` and ``eval``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from qlora_ray.spec.fields import CHECKPOINTING, EVAL_KEEP, OPTIMIZERS, SCHEDULERS, SEED_MAX, Problem, one_of, setting


@dataclass
class TrainSpec:
    lr: float = setting(2.0e-4, "Peak learning rate, in (0, 1).")
    epochs: float = setting(1.0, "Passes over the training set (ignored when max_steps is set).")
    max_steps: Optional[int] = setting(None, "Stop after this many optimizer steps.")
    batch_size: int = setting(8, "Rows per micro-batch.")
    grad_accum: int = setting(1, "Micro-batches per optimizer step.")
    warmup_ratio: float = setting(0.03, "Fraction of steps spent warming the learning rate up, in [0, 1).")
    scheduler: str = setting("cosine", "Learning-rate decay after warmup: cosine, linear or constant.")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0 disables).")
    optimizer: str = setting("auto", "auto (paged 8-bit AdamW on CUDA, AdamW on CPU), adamw, adamw_8bit, paged_adamw_8bit.")
    gradient_checkpointing: str = setting(
        "true", "Recompute activations in backward to save memory: true, false, or auto (off, and "
        "switched on for the rest of the trial if a step runs out of GPU memory).")
    checkpoint_every: int = setting(50, "Save a resumable checkpoint every N optimizer steps (and at the end).")
    log_every: int = setting(5, "Report metrics every N optimizer steps.")
    seed: int = setting(42, "Seed for initialization, dropout and data order.")
    fused: str = setting("auto", "Train through fused QLoRA layers (stacked q/k/v, SwiGLU MLP, 4-bit weights "
                                 "dequantized in the compute dtype; adapters stay standard peft): true, false, or "
                                 "auto (on where the kernels support the model and settings, else the peft path, "
                                 "with the reason logged).")

    @property
    def checkpointing(self) -> str:
        """``gradient_checkpointing`` as one of auto, true, false (YAML booleans arrive as 'True')."""
        return str(self.gradient_checkpointing).lower()

    @property
    def fused_mode(self) -> str:
        """``fused`` as one of auto, true, false."""
        return str(self.fused).lower()

    def problems(self) -> Iterator[Problem]:
        if not 0.0 < self.lr < 1.0:
            yield "lr", f"must be in (0, 1), got {self.lr}"
        if self.epochs <= 0:
            yield "epochs", f"must be > 0, got {self.epochs}"
        for key in ("batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, key) < 1:
                yield key, f"must be >= 1, got {getattr(self, key)}"
        if self.max_steps is not None and self.max_steps < 1:
            yield "max_steps", f"must be >= 1 when set, got {self.max_steps}"
        if not 0.0 <= self.warmup_ratio < 1.0:
            yield "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}"
        yield from one_of("gradient_checkpointing", self.checkpointing, CHECKPOINTING, shown=self.gradient_checkpointing)
        yield from one_of("scheduler", self.scheduler, SCHEDULERS)
        yield from one_of("optimizer", self.optimizer, OPTIMIZERS)
        if self.weight_decay < 0:
            yield "weight_decay", f"must be >= 0, got {self.weight_decay}"
        if self.max_grad_norm < 0:
            yield "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}"
        yield from one_of("fused", self.fused_mode, CHECKPOINTING, shown=self.fused)


@dataclass
class EvalSpec:
    perplexity: bool = setting(True, "Measure base and tuned perplexity on the eval set's target tokens.")
    prompts: Optional[str] = setting(None, "Text file with one user prompt per line for side-by-side sample replies.")
    max_prompts: Optional[int] = setting(None, "Use at most this many prompts.")
    max_new_tokens: int = setting(96, "Tokens generated per sample reply.")
    batch_size: int = setting(8, "Rows per evaluation batch.")
    every_steps: Optional[int] = setting(None, "Measure eval perplexity every N optimizer steps (and at the last step) "
                                               "while training: written to metrics.jsonl, reported to Ray Tune as "
                                               "the trial's metric (what search.scheduler acts on). An eval step "
                                               "also writes a checkpoint.")
    periodic_max_examples: Optional[int] = setting(None, "Periodic evals use only the first N eval examples "
                                                         "(the final eval always uses all of them).")
    keep: str = setting("last", "Which adapter a trial keeps in adapter/: last (the last step's) or best (the "
                                "periodic eval step with the lowest eval perplexity; needs eval.every_steps).")
    temperature: float = setting(0.0, "Sample replies' temperature: 0 decodes greedily (the same reply every run); "
                                      "above 0 samples, seeded by eval.seed. The same for base and tuned.")
    top_p: float = setting(1.0, "Nucleus sampling: sample from the smallest set of tokens holding this much "
                                "probability, in (0, 1] (only when temperature > 0).")
    repetition_penalty: float = setting(1.2, "Divide the score of tokens already in the reply (and prompt) by this, "
                                             ">= 1 (1 is off). With no_repeat_ngram_size it keeps small models "
                                             "from looping (\"kabir, kabir, kabir\").")
    no_repeat_ngram_size: int = setting(3, "Never generate the same run of this many tokens twice in a reply "
                                           "(0 is off).")
    seed: int = setting(0, "Seed for sampled replies (temperature > 0), so base and tuned draw alike and a re-run "
                           "gives the same replies.")
    control: Optional[str] = setting(None, "A second eval set (file, glob or hf://) measured base vs tuned in every trial: "
                                           "what the model should not forget (general chat).")
    max_control_examples: Optional[int] = setting(None, "Use at most this many control examples.")
    quantization_cost: bool = setting(True, "Also measure the base model unquantized (once, cached) and each trial's "
                                            "change against it (with a quantized base).")

    def problems(self) -> Iterator[Problem]:
        for key in ("every_steps", "periodic_max_examples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                yield key, f"must be >= 1 when set, got {value}"
        yield from one_of("keep", self.keep, EVAL_KEEP)
        if self.keep == "best" and self.every_steps is None:
            yield "keep", "best picks among the periodic evals, but eval.every_steps is not set; set it or use keep: last"
        if self.every_steps is not None and not self.perplexity:
            yield "every_steps", "needs eval.perplexity: true (periodic evals measure perplexity)"
        if self.max_control_examples is not None and self.max_control_examples < 1:
            yield "max_control_examples", f"must be >= 1 when set, got {self.max_control_examples}"
        if self.max_new_tokens < 1:
            yield "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}"
        if not 0.0 <= self.temperature <= 100.0:
            yield "temperature", f"must be in [0, 100], got {self.temperature}"
        if not 0.0 < self.top_p <= 1.0:
            yield "top_p", f"must be in (0, 1], got {self.top_p}"
        if not 1.0 <= self.repetition_penalty <= 10.0:
            yield "repetition_penalty", f"must be in [1, 10] (1 is off), got {self.repetition_penalty}"
        if self.no_repeat_ngram_size < 0:
            yield "no_repeat_ngram_size", f"must be >= 0 (0 is off), got {self.no_repeat_ngram_size}"
        if not 0 <= self.seed <= SEED_MAX:
            yield "seed", f"must be in [0, {SEED_MAX}], got {self.seed}"
        if self.batch_size < 1:
            yield "batch_size", f"must be >= 1, got {self.batch_size}"
        if self.max_prompts is not None and self.max_prompts < 1:
            yield "max_prompts", f"must be >= 1 when set, got {self.max_prompts}"
