"""The job spec: typed schema, strict loading, validation.

A spec is YAML data, never code: it is read with ``yaml.safe_load``, interpolations
(``${...}``) are refused, and every value is checked against the dataclasses below.
All problems are collected and raised together as one :class:`SpecError`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import glob
import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qlora_ray import strict_yaml
from qlora_ray.errors import UserError

# The offline default model: SmolLM2-135M-Instruct shipped as GGUF inside a PyPI package.
OFFLINE_ALIASES = ("smollm2-135m-instruct",)
DATA_FORMATS = ("auto", "messages", "alpaca", "prompt_response", "text")
QUANT_MODES = ("nf4", "fp4", "int8", "none")
DTYPES = ("auto", "bf16", "fp16", "fp32")
SCHEDULERS = ("cosine", "linear", "constant")
CHECKPOINTING = ("auto", "true", "false")
OPTIMIZERS = ("auto", "adamw", "adamw_8bit", "paged_adamw_8bit")
# GPUs without bf16 support (compute capability < 8.0) that people rent for QLoRA.
NO_BF16_ACCELERATORS = ("T4", "V100", "P100", "K80", "P4")
URI_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "az://", "hdfs://", "file://")
# A name and a trial id each name a folder (at most 255 bytes on common file systems) that
# can gain a suffix such as ".old-<time>"; this leaves room for it.
MAX_NAME_BYTES = 200
SEED_MAX = 2**32 - 1  # numpy's RandomState and many libraries take 32-bit seeds
INT_MAX = 2**31 - 1
# Upper bounds past which a value is a typo, not a setting (checked for every trial).
MAXIMA = {"data.max_seq_len": 1 << 20, "data.seed": SEED_MAX, "train.seed": SEED_MAX,
          "lora.r": 4096, "lora.alpha": 1 << 16, "train.epochs": 10_000,
          "resources.gpus_per_trial": 64, "resources.cpus_per_trial": 1024, "resources.max_trials": 1_000_000}
MINIMA = {"data.seed": 0, "train.seed": 0}
SHOWN_CHARS = 80  # how much of a value a message echoes
MESSAGE_CHARS = 400  # and how long one problem line may get


def show(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr``-like text of a value for a message, cut to ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _f(default: Any, help: str) -> Any:
    """A schema field: the default lives here, the help text doubles as documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _sub(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


Problem = tuple  # (key path, message)


@dataclass
class ModelSpec:
    name: str = _f(MISSING, "Hub id (org/name), local HF directory, .gguf file, or the offline alias 'smollm2-135m-instruct'.")
    revision: Optional[str] = _f(None, "Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub to run. Off unless you trust the repo.")

    def problems(self) -> Iterator[Problem]:
        if not self.name.strip():
            yield "name", "must not be empty"


@dataclass
class DataSpec:
    train: str = _f(MISSING, "Training data: a local .jsonl/.json/.csv/.parquet file or glob, or hf://org/name[:split].")
    eval: Optional[str] = _f(None, "Held-out data in the same forms; if unset, eval_fraction of train is held out.")
    eval_fraction: float = _f(0.05, "Fraction of train held out for evaluation when eval is unset (fixed seed).")
    format: str = _f("auto", "Row format: auto, messages, alpaca, prompt_response or text.")
    max_seq_len: int = _f(512, "Maximum tokens per training row; longer examples are truncated.")
    packing: bool = _f(True, "Pack several examples per row (attention stays within each example).")
    train_on_prompt: bool = _f(False, "Also train on user/system tokens, not only assistant replies.")
    chat_template: Optional[str] = _f(None, "Jinja chat template overriding the tokenizer's own.")
    max_train_examples: Optional[int] = _f(None, "Use at most this many training examples (after shuffling).")
    max_eval_examples: Optional[int] = _f(None, "Use at most this many eval examples.")
    seed: int = _f(42, "Seed for shuffling and the eval split.")
    cache_dir: str = _f("~/.cache/qlora-ray", "Where tokenized datasets and converted models are cached.")
    test: Optional[str] = _f(None, "Held-out test data in the same forms: measured only for the selected best "
                                   "trial and reported apart (the eval set selects, the test set reports).")
    max_test_examples: Optional[int] = _f(None, "Use at most this many test examples.")

    def problems(self) -> Iterator[Problem]:
        if self.format not in DATA_FORMATS:
            yield "format", f"'{self.format}' is not one of {', '.join(DATA_FORMATS)}"
        if self.max_seq_len < 16:
            yield "max_seq_len", f"must be >= 16, got {self.max_seq_len}"
        if not 0.0 <= self.eval_fraction < 1.0:
            yield "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}"
        for key in ("max_train_examples", "max_eval_examples", "max_test_examples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                yield key, f"must be >= 1 when set, got {value}"


@dataclass
class QuantizationSpec:
    mode: str = _f("nf4", "Base weight quantization: nf4, fp4 (4-bit), int8, or none.")
    double_quant: bool = _f(True, "Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: str = _f("auto", "auto (bf16 on sm>=80, fp16 on older GPUs such as T4, fp32 on CPU), bf16, fp16, fp32.")
    cpu_dequantize: bool = _f(True, "On the CPU, dequantize the 4-bit (nf4, fp4) base weights once to the compute "
                                    "dtype and keep them: the same values bitsandbytes dequantizes at every "
                                    "forward (the adapter still learns the 4-bit base); generating replies about "
                                    "4x cheaper per layer, train steps the same; the base's memory that of an "
                                    "unquantized one. false: dequantize at "
                                    "every forward, as on a GPU (a big model on a small CPU machine). No effect "
                                    "on GPUs, for int8, or with lora.init loftq (it needs the 4-bit layers).")

    def problems(self) -> Iterator[Problem]:
        if self.mode not in QUANT_MODES:
            yield "mode", f"'{self.mode}' is not one of {', '.join(QUANT_MODES)}"
        if self.compute_dtype not in DTYPES:
            yield "compute_dtype", f"'{self.compute_dtype}' is not one of {', '.join(DTYPES)}"


@dataclass
class LoraSpec:
    r: int = _f(16, "LoRA rank.")
    alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora).")
    dropout: float = _f(0.05, "Dropout on the LoRA input, in [0, 1).")
    target_modules: List[str] = _f(["all-linear"], "Modules to adapt: 'all-linear' or a list of module names.")
    rslora: bool = _f(False, "Rank-stabilized scaling alpha / sqrt(r).")
    init: str = _f("default", "LoRA weight initialisation, passed to peft: default (B = 0), gaussian, orthogonal, "
                              "nora, or loftq (with a 4-bit base: A and B start at the quantization error).")

    def problems(self) -> Iterator[Problem]:
        if self.r < 1:
            yield "r", f"must be >= 1, got {self.r}"
        if self.alpha < 1:
            yield "alpha", f"must be >= 1, got {self.alpha}"
        if not 0.0 <= self.dropout < 1.0:
            yield "dropout", f"must be in [0, 1), got {self.dropout}"
        if not self.target_modules:
            yield "target_modules", "must name at least one module (or 'all-linear')"
        from qlora_ray.lora_init import init_problem

        problem = init_problem(self.init)
        if problem:
            yield "init", problem


@dataclass
class TrainSpec:
    lr: float = _f(2.0e-4, "Peak learning rate, in (0, 1).")
    epochs: float = _f(1.0, "Passes over the training set (ignored when max_steps is set).")
    max_steps: Optional[int] = _f(None, "Stop after this many optimizer steps.")
    batch_size: int = _f(8, "Rows per micro-batch.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    warmup_ratio: float = _f(0.03, "Fraction of steps spent warming the learning rate up, in [0, 1).")
    scheduler: str = _f("cosine", "Learning-rate decay after warmup: cosine, linear or constant.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    optimizer: str = _f("auto", "auto (paged 8-bit AdamW on CUDA, AdamW on CPU), adamw, adamw_8bit, paged_adamw_8bit.")
    gradient_checkpointing: str = _f(
        "true", "Recompute activations in backward to save memory: true, false, or auto (off, and "
        "switched on for the rest of the trial if a step runs out of GPU memory).")
    checkpoint_every: int = _f(50, "Save a resumable checkpoint every N optimizer steps (and at the end).")
    log_every: int = _f(5, "Report metrics every N optimizer steps.")
    seed: int = _f(42, "Seed for initialization, dropout and data order.")
    fused: str = _f("auto", "Train through fused QLoRA layers (stacked q/k/v, SwiGLU MLP, 4-bit weights "
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
        if self.checkpointing not in CHECKPOINTING:
            yield "gradient_checkpointing", f"'{self.gradient_checkpointing}' is not one of {', '.join(CHECKPOINTING)}"
        if self.scheduler not in SCHEDULERS:
            yield "scheduler", f"'{self.scheduler}' is not one of {', '.join(SCHEDULERS)}"
        if self.optimizer not in OPTIMIZERS:
            yield "optimizer", f"'{self.optimizer}' is not one of {', '.join(OPTIMIZERS)}"
        if self.weight_decay < 0:
            yield "weight_decay", f"must be >= 0, got {self.weight_decay}"
        if self.max_grad_norm < 0:
            yield "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}"
        if self.fused_mode not in CHECKPOINTING:
            yield "fused", f"'{self.fused}' is not one of {', '.join(CHECKPOINTING)}"


@dataclass
class EvalSpec:
    perplexity: bool = _f(True, "Measure base and tuned perplexity on the eval set's target tokens.")
    prompts: Optional[str] = _f(None, "Text file with one user prompt per line for side-by-side sample replies.")
    max_prompts: Optional[int] = _f(None, "Use at most this many prompts.")
    max_new_tokens: int = _f(96, "Tokens generated per sample reply.")
    batch_size: int = _f(8, "Rows per evaluation batch.")
    every_steps: Optional[int] = _f(None, "Measure eval perplexity every N optimizer steps (and at the last step) "
                                          "while training: written to metrics.jsonl, reported to Ray Tune as "
                                          "the trial's metric (what search.scheduler acts on). An eval step "
                                          "also writes a checkpoint.")
    periodic_max_examples: Optional[int] = _f(None, "Periodic evals use only the first N eval examples "
                                                    "(the final eval always uses all of them).")
    keep: str = _f("last", "Which adapter a trial keeps in adapter/: last (the last step's) or best (the "
                           "periodic eval step with the lowest eval perplexity; needs eval.every_steps).")
    temperature: float = _f(0.0, "Sample replies' temperature: 0 decodes greedily (the same reply every run); "
                                 "above 0 samples, seeded by eval.seed. The same for base and tuned.")
    top_p: float = _f(1.0, "Nucleus sampling: sample from the smallest set of tokens holding this much "
                           "probability, in (0, 1] (only when temperature > 0).")
    repetition_penalty: float = _f(1.2, "Divide the score of tokens already in the reply (and prompt) by this, "
                                        ">= 1 (1 is off). With no_repeat_ngram_size it keeps small models "
                                        "from looping (\"kabir, kabir, kabir\").")
    no_repeat_ngram_size: int = _f(3, "Never generate the same run of this many tokens twice in a reply "
                                      "(0 is off).")
    seed: int = _f(0, "Seed for sampled replies (temperature > 0), so base and tuned draw alike and a re-run "
                      "gives the same replies.")
    control: Optional[str] = _f(None, "A second eval set (file, glob or hf://) measured base vs tuned in every trial: "
                                      "what the model should not forget (general chat).")
    max_control_examples: Optional[int] = _f(None, "Use at most this many control examples.")
    quantization_cost: bool = _f(True, "Also measure the base model unquantized (once, cached) and each trial's "
                                       "change against it (with a quantized base).")

    def problems(self) -> Iterator[Problem]:
        for key in ("every_steps", "periodic_max_examples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                yield key, f"must be >= 1 when set, got {value}"
        if self.keep not in EVAL_KEEP:
            yield "keep", f"'{self.keep}' is not one of {', '.join(EVAL_KEEP)}"
        elif self.keep == "best" and self.every_steps is None:
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


RUNNERS = ("train", "tune")
EVAL_KEEP = ("last", "best")
WANDB_MODES = ("offline", "online")


@dataclass
class ResourcesSpec:
    gpus_per_trial: float = _f(1.0, "GPUs per trial worker: 0 trains on the CPU; a fraction such as 0.25 runs "
                                    "several trials on one GPU, each capped at that share of its memory.")
    cpus_per_trial: float = _f(1.0, "CPUs per trial worker.")
    accelerator_type: Optional[str] = _f(None, "Ray accelerator type the worker needs, e.g. T4, A100.")
    max_concurrent_trials: int = _f(0, "Trials run at once; 0 picks from the cluster's GPUs (or CPUs).")
    max_failures: int = _f(2, "Retries per trial after a worker dies; each resumes from its last checkpoint.")
    max_trials: int = _f(1000, "Refuse a sweep of more trials than this (a guard against a mistyped grid).")
    runner: str = _f("train", "How a trial runs: train (a Ray Train TorchTrainer with one worker; Train "
                              "restarts a dead worker) or tune (the trial's Tune process trains itself; Tune "
                              "restarts it). tune starts each trial about 20 s sooner: for short trials and "
                              "dense sweeps.")
    time_budget: Optional[str] = _f(None, "Wall time a submit may use, from its start (e.g. 11h30m for a Kaggle "
                                          "session, 90s): when less than one step plus one checkpoint is left, "
                                          "every trial saves a checkpoint and stops (stopped: time budget), submit "
                                          "exits 3 and prints the command that resumes. null: no limit.")

    def problems(self) -> Iterator[Problem]:
        if self.time_budget is not None:
            from qlora_ray.budget import parse_duration

            try:
                parse_duration(self.time_budget)
            except ValueError as e:
                yield "time_budget", str(e)
        if self.runner not in RUNNERS:
            yield "runner", f"'{self.runner}' is not one of {', '.join(RUNNERS)}"
        if self.gpus_per_trial < 0:
            yield "gpus_per_trial", f"must be >= 0, got {self.gpus_per_trial}"
        if self.cpus_per_trial <= 0:
            yield "cpus_per_trial", f"must be > 0, got {self.cpus_per_trial}"
        if self.max_concurrent_trials < 0:
            yield "max_concurrent_trials", f"must be >= 0, got {self.max_concurrent_trials}"
        if self.max_failures < 0:
            yield "max_failures", f"must be >= 0, got {self.max_failures}"
        if self.max_trials < 1:
            yield "max_trials", f"must be >= 1, got {self.max_trials}"
        if self.accelerator_type is not None and self.gpus_per_trial == 0:
            yield "accelerator_type", "is set but gpus_per_trial is 0; set gpus_per_trial or drop accelerator_type"


SEARCH_SCHEDULERS = ("none", "asha", "median")
SEARCH_METHODS = ("grid", "random")
# A swept key's value in ``sweep:`` for random search: ``{loguniform: [low, high]}`` and the like.
DISTRIBUTIONS = ("loguniform", "uniform", "choice")
MAX_SEEDS = 1000


@dataclass
class SearchSpec:
    scheduler: str = _f("none", "Stop losing trials early on their periodic eval perplexity (needs eval.every_steps): "
                                "none, asha (Tune's asynchronous successive halving) or median (stop a trial "
                                "worse than the median of the others at the same step). A stopped trial is "
                                "'pruned': it keeps its last checkpoint and adapter, and a re-submit leaves it.")
    grace_period: Optional[int] = _f(None, "Optimizer steps every trial runs before it may be stopped "
                                           "(default: eval.every_steps).")
    reduction_factor: float = _f(2.0, "asha: the share of trials kept at each rung is 1 / reduction_factor.")
    method: str = _f("grid", "grid (every combination of the sweep's lists) or random (num_samples draws; a "
                             "sweep key may then be a distribution: {loguniform: [low, high]}, {uniform: [low, "
                             "high]} or {choice: [values]}; a list is a choice).")
    num_samples: int = _f(10, "random: how many configurations are drawn.")
    seed: int = _f(0, "random: seed of the draws; the same seed draws the same trials (and trial ids), so a "
                      "re-submit resumes them, and a larger num_samples keeps the first draws.")
    seeds: int = _f(1, "Run each configuration with this many values of train.seed (train.seed, +1, ...); the "
                       "leaderboard shows mean and spread per configuration.")

    def problems(self) -> Iterator[Problem]:
        if self.scheduler not in SEARCH_SCHEDULERS:
            yield "scheduler", f"'{self.scheduler}' is not one of {', '.join(SEARCH_SCHEDULERS)}"
        if self.grace_period is not None and self.grace_period < 1:
            yield "grace_period", f"must be >= 1 when set, got {self.grace_period}"
        if not 1.0 < self.reduction_factor <= 100:
            yield "reduction_factor", f"must be in (1, 100], got {self.reduction_factor}"
        if self.method not in SEARCH_METHODS:
            yield "method", f"'{self.method}' is not one of {', '.join(SEARCH_METHODS)}"
        if self.num_samples < 1:
            yield "num_samples", f"must be >= 1, got {self.num_samples}"
        if not 0 <= self.seed <= SEED_MAX:
            yield "seed", f"must be in [0, {SEED_MAX}], got {self.seed}"
        if not 1 <= self.seeds <= MAX_SEEDS:
            yield "seeds", f"must be in [1, {MAX_SEEDS}], got {self.seeds}"
SELECT_METRICS = ("eval_ppl", "ppl_change", "control_ppl")


@dataclass
class ResultsSpec:
    select: str = _f("eval_ppl", "What picks the best trial (lowest wins): eval_ppl, ppl_change or control_ppl.")
    max_control_increase: Optional[float] = _f(None, "Pass over a trial whose control perplexity rose by more "
                                                     "than this fraction (0.10 = 10%); needs eval.control.")

    def problems(self) -> Iterator[Problem]:
        if self.select not in SELECT_METRICS:
            yield "select", f"'{self.select}' is not one of {', '.join(SELECT_METRICS)}"
        if self.max_control_increase is not None and self.max_control_increase < 0:
            yield "max_control_increase", f"must be >= 0 when set, got {self.max_control_increase}"


@dataclass
class MLflowSpec:
    tracking_uri: Optional[str] = _f(None, "MLflow tracking URI (a server such as http://127.0.0.1:5000, or a local "
                                           "store such as file:./mlruns); set it to log each trial as an MLflow run. "
                                           "Needs pip install 'qlora-ray[mlflow]'.")
    experiment: Optional[str] = _f(None, "MLflow experiment the runs go to; null: the job's name.")


@dataclass
class WandbSpec:
    project: Optional[str] = _f(None, "Weights & Biases project; set it to log each trial as a W&B run. "
                                      "Needs pip install 'qlora-ray[wandb]'.")
    mode: str = _f("offline", "offline (files under the experiment folder; `wandb sync` uploads them later) "
                              "or online.")


@dataclass
class TrackingSpec:
    tensorboard: bool = _f(False, "TensorBoard event files, one folder per trial under <experiment>/tensorboard/. "
                                  "Needs pip install 'qlora-ray[tensorboard]' (tensorboardX; Ray ships it).")
    mlflow: MLflowSpec = _sub(MLflowSpec, "MLflow: one run per trial.")
    wandb: WandbSpec = _sub(WandbSpec, "Weights & Biases: one run per trial.")

    def problems(self) -> Iterator[Problem]:
        if self.wandb.mode not in WANDB_MODES:
            yield "wandb.mode", f"'{self.wandb.mode}' is not one of {', '.join(WANDB_MODES)}"
        if self.mlflow.experiment is not None and self.mlflow.tracking_uri is None:
            yield "mlflow.tracking_uri", "is required when mlflow.experiment is set (e.g. file:./mlruns)"
        wanted = [("tensorboard", self.tensorboard, "tensorboardX", "tensorboard"),
                  ("mlflow", self.mlflow.tracking_uri is not None, "mlflow", "mlflow"),
                  ("wandb", self.wandb.project is not None, "wandb", "wandb")]
        for key, on, module, extra in wanted:
            if on and importlib.util.find_spec(module) is None:
                yield key, f"the {module} package is not installed; pip install 'qlora-ray[{extra}]'"


@dataclass
class OutputSpec:
    dir: str = _f("runs", "Where experiments are written: a path (relative to the spec) or a storage URI (s3://, gs://).")


@dataclass
class JobSpec:
    name: str = _f(MISSING, "Experiment name; names the output folder and the trial ids.")
    base: Optional[str] = _f(None, "Another spec file this one inherits from (relative to this file).")
    model: ModelSpec = _sub(ModelSpec, "The base model.")
    data: DataSpec = _sub(DataSpec, "Training and evaluation data.")
    quantization: QuantizationSpec = _sub(QuantizationSpec, "How the frozen base is quantized.")
    lora: LoraSpec = _sub(LoraSpec, "The LoRA adapters.")
    train: TrainSpec = _sub(TrainSpec, "Optimization.")
    eval: EvalSpec = _sub(EvalSpec, "Evaluation.")
    sweep: Dict[str, Any] = _f({}, "Dotted spec path -> list of values (grid: trials are the product), or with "
                                   "search.method random a distribution such as {loguniform: [1e-5, 1e-3]}.")
    resources: ResourcesSpec = _sub(ResourcesSpec, "What each trial needs from the cluster.")
    output: OutputSpec = _sub(OutputSpec, "Where results go.")
    search: SearchSpec = _sub(SearchSpec, "How the sweep is searched and which trials are stopped early.")
    results: ResultsSpec = _sub(ResultsSpec, "How the best trial is chosen.")
    tracking: TrackingSpec = _sub(TrackingSpec, "Experiment trackers each trial logs to (MLflow, W&B, TensorBoard).")

    def problems(self) -> Iterator[Problem]:
        seen = set()
        for key, message in self._all_problems():
            if key not in seen:  # the first, most basic problem of a key is enough
                seen.add(key)
                yield key, message

    def _all_problems(self) -> Iterator[Problem]:
        yield from name_problems(self.name)
        yield from _number_problems(self)
        for section in (self.model, self.data, self.quantization, self.lora, self.train,
                        self.eval, self.resources, self.tracking):
            prefix = _SECTION_NAMES[type(section)]
            for key, message in section.problems():
                yield f"{prefix}.{key}", message
        yield from _search_problems(self)
        accel = (self.resources.accelerator_type or "").upper()
        if self.quantization.compute_dtype == "bf16" and accel in NO_BF16_ACCELERATORS:
            yield "quantization.compute_dtype", f"bf16 is not supported on {accel}; use auto or fp16"
        for key, message in self.results.problems():
            yield f"results.{key}", message
        if self.results.max_control_increase is not None and not self.eval.control:
            yield "results.max_control_increase", "needs a control set: set eval.control (or drop this key)"
        if self.lora.init == "loftq" and self.quantization.mode not in ("nf4", "fp4"):
            yield "lora.init", f"loftq starts the adapter at the 4-bit quantization error; with quantization.mode " \
                               f"'{self.quantization.mode}' there is none (use nf4, or lora.init=default)"

    @property
    def experiment_dir(self) -> str:
        """The experiment's folder (path or URI): ``<output.dir>/<name>``."""
        return f"{self.output.dir.rstrip('/')}/{self.name}"


_SECTION_NAMES = {ModelSpec: "model", DataSpec: "data", QuantizationSpec: "quantization",
                  LoraSpec: "lora", TrainSpec: "train", EvalSpec: "eval",
                  ResourcesSpec: "resources", OutputSpec: "output", ResultsSpec: "results",
                  TrackingSpec: "tracking"}
# Mappings nested inside a section, checked and flattened like the sections themselves.
_SUBSECTIONS = {"tracking.mlflow": MLflowSpec, "tracking.wandb": WandbSpec}
_SECTION_NAMES[SearchSpec] = "search"


def _search_problems(spec: "JobSpec") -> Iterator[Problem]:
    """The search section's own checks, then what it needs from the others."""
    for key, message in spec.search.problems():
        yield f"search.{key}", message
    if spec.search.scheduler != "none" and spec.eval.every_steps is None:
        yield "search.scheduler", (f"'{spec.search.scheduler}' stops trials on their periodic eval perplexity, "
                                   "but eval.every_steps is not set; set it (e.g. eval.every_steps: 10) or "
                                   "use search.scheduler: none")
    if spec.search.method == "random" and not spec.sweep:
        yield "search.method", "random draws from the sweep's keys, but sweep is empty; add e.g. train.lr: {loguniform: [1e-5, 1e-3]}"
    if spec.search.seeds > 1 and "train.seed" in spec.sweep:
        yield "search.seeds", "repeats each configuration over train.seed values, so train.seed cannot also be swept; drop one"


def name_problems(name: str, key: str = "name") -> Iterator[Problem]:
    """Why ``name`` cannot name a folder and a Ray run (nothing when it can)."""
    if not name or any(c in name for c in "/\\ ") or name.startswith("."):
        yield key, f"'{show(name)}' must be a non-empty name without slashes or spaces, not starting with '.'"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        yield key, f"{show(ascii(name))} holds a control character (such as NUL); use letters, digits, '-', '_', '.'"
    elif len(name.encode("utf-8")) > MAX_NAME_BYTES:
        yield key, (f"'{show(name)}' is {len(name.encode('utf-8'))} bytes; at most {MAX_NAME_BYTES} "
                    "(it names folders, which hold 255 bytes and gain suffixes)")


def _number_problems(spec: "JobSpec") -> Iterator[Problem]:
    """Every number finite and within sane bounds; the sections check their own ranges after."""
    values = {}
    for name in ("data", "lora", "train", "eval", "resources", "results"):
        section = getattr(spec, name)
        values.update({f"{name}.{f.name}": getattr(section, f.name) for f in dataclasses.fields(section)})
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            yield key, f"must be a finite number, got {value}"
            continue
        low, high = MINIMA.get(key), MAXIMA.get(key, INT_MAX)
        if low is not None and value < low:
            yield key, f"must be in [{low}, {high}], got {value}"
        elif value > high:
            yield key, f"must be <= {high:,}, got {show(value, 40)}"


class SpecError(UserError):
    """Every problem found in a spec, each as ``<file>: <key.path>: <message>``."""

    def __init__(self, problems: List[str]):
        # A message never echoes a whole value: a spec may hold megabytes in one string.
        self.problems = [p if len(p) <= MESSAGE_CHARS else f"{p[:MESSAGE_CHARS]}... (cut)" for p in problems]
        super().__init__("\n".join(self.problems))


# ---------------------------------------------------------------- schema walking

def _schema_fields(cls: type) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def leaf_paths(cls: type = JobSpec, prefix: str = "") -> Dict[str, dataclasses.Field]:
    """All dotted leaf paths of the schema (sections expanded), e.g. ``lora.r``."""
    out = {}
    for name, f in _schema_fields(cls).items():
        path = f"{prefix}{name}"
        if cls is JobSpec and name in _SECTION_NAMES.values():
            out.update(leaf_paths(_section_class(name), path + "."))
        elif path in _SUBSECTIONS:
            out.update(leaf_paths(_SUBSECTIONS[path], path + "."))
        else:
            out[path] = f
    return out


def _section_class(name: str) -> type:
    return {v: k for k, v in _SECTION_NAMES.items()}[name]


def _unknown_keys(raw: Dict[str, Any], cls: type, prefix: str) -> Iterator[Problem]:
    known = _schema_fields(cls)
    for key, value in raw.items():
        path = f"{prefix}{show(key, 60)}"
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            yield path, f"unknown key{hint}"
        elif cls is JobSpec and key in _SECTION_NAMES.values():
            if not isinstance(value, dict):
                yield path, f"must be a mapping of {key} settings, got {type(value).__name__}"
            else:
                yield from _unknown_keys(value, _section_class(key), path + ".")
        elif f"{prefix}{key}" in _SUBSECTIONS:
            if not isinstance(value, dict):
                yield path, f"must be a mapping of {key} settings, got {type(value).__name__}"
            else:
                yield from _unknown_keys(value, _SUBSECTIONS[f"{prefix}{key}"], path + ".")


def _flatten(raw: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and (path in _SECTION_NAMES.values() or path in _SUBSECTIONS):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, list):
        return any(_has_interpolation(v) for v in value)
    if isinstance(value, dict):
        return any(_has_interpolation(v) for v in value.values())
    return False


# ---------------------------------------------------------------- loading

def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = _parse_yaml(strict_yaml.decode(path.read_bytes()))
    except OSError as e:
        raise SpecError([f"{path}: cannot read spec file: {e.strerror}"]) from None
    except strict_yaml.YamlProblem as e:
        raise SpecError([f"{path}: {where + ': ' if where else ''}{message}" for where, message in e.problems]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SpecError([f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError([f"{path}: a spec must be a YAML mapping of sections, got {type(data).__name__}"])
    return data


def _parse_yaml(text: str) -> Any:
    return strict_yaml.load(text)


def _deep_merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "sweep":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_chain(path: Path, seen: tuple = ()) -> tuple[Dict[str, Any], Dict[str, Path]]:
    """Read a spec and its ``base:`` ancestors; returns the merged tree and each leaf's source file."""
    path = path.resolve()
    if path in seen:
        raise SpecError([f"{path}: base: inheritance loops back to this file"])
    raw = _read_yaml(path)
    # Relative paths are anchored to the file that wrote them, before files are merged.
    raw = _anchor_paths(raw, path.parent)
    origin = {k: path for k in _flatten(raw)}
    base = raw.get("base")
    if base is None:
        return raw, origin
    if not isinstance(base, str):
        raise SpecError([f"{path}: base: must be a path to another spec file"])
    base_path = Path(base) if Path(base).is_absolute() else path.parent / base
    if not base_path.is_file():
        raise SpecError([f"{path}: base: file '{base}' not found (looked at {base_path})"])
    parent, parent_origin = _load_chain(base_path, seen + (path,))
    merged = _deep_merge(parent, {k: v for k, v in raw.items() if k != "base"})
    merged["base"] = str(base_path.resolve())
    return merged, {**parent_origin, **origin}


_PATH_KEYS = ("data.train", "data.eval", "eval.prompts", "output.dir", "model.name", "data.cache_dir",
              "data.test", "eval.control")


def _is_uri(value: str) -> bool:
    return value.startswith("hf://") or value.startswith(URI_SCHEMES)


def _looks_local(key: str, value: str, anchor: Path) -> bool:
    if key != "model.name":
        return True
    # A model name is a path when it says so or exists on disk; otherwise a hub id or alias.
    return (value.startswith((".", "/", "~")) or value.endswith(".gguf")
            or (anchor / value).exists())


def _anchor_paths(raw: Dict[str, Any], anchor: Path) -> Dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key in _PATH_KEYS:
        section, leaf = key.split(".")
        value = out.get(section, {}).get(leaf) if isinstance(out.get(section), dict) else None
        out_value = _anchor_path(key, value, anchor)
        if out_value is not value:
            out[section][leaf] = out_value
        # Swept paths are relative to the file that wrote them, like any other path.
        swept = out["sweep"].get(key) if isinstance(out.get("sweep"), dict) else None
        if isinstance(swept, list):
            out["sweep"] = {**out["sweep"], key: [_anchor_path(key, v, anchor) for v in swept]}
    return out


def _anchor_path(key: str, value: Any, anchor: Path) -> Any:
    """``value`` made absolute against ``anchor`` when it is a local path (else unchanged)."""
    if not isinstance(value, str) or not value or _is_uri(value) or "${" in value:
        return value
    if key == "data.cache_dir" or value.startswith("~"):
        value = os.path.expanduser(value)
    if key == "data.cache_dir" and not os.path.isabs(value):
        return value
    if _looks_local(key, value, anchor):
        return os.path.normpath(str(anchor / value))
    return value


def parse_overrides(overrides: List[str]) -> Dict[str, Any]:
    """``['train.lr=1e-4', 'lora.r=8']`` -> ``{'train.lr': '1e-4', 'lora.r': 8}`` (values parsed as YAML)."""
    out, bad = {}, []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            bad.append(f"override '{item}': expected key.path=value, e.g. train.lr=1e-4")
            continue
        try:
            out[key.strip()] = _parse_yaml(value) if value.strip() else None
        except strict_yaml.AliasError as e:
            bad.append(f"command line: {show(key.strip(), 60)}: {e.problem}")
        except (yaml.YAMLError, strict_yaml.YamlProblem):
            out[key.strip()] = value
    if bad:
        raise SpecError(bad)
    return out


def _set_path(tree: Dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def load_spec(path: str | os.PathLike, overrides: Optional[List[str]] = None) -> JobSpec:
    """Load, inherit, override and validate a job spec; raise :class:`SpecError` with every problem."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"{path}: spec file not found"])
    raw, origin = _load_chain(path)
    cwd = Path.cwd()
    given = parse_overrides(overrides or [])
    if "base" in given:
        raise SpecError([f"command line: base: cannot be given as an override (base is read before the "
                         f"spec, overrides after it); write 'base: {show(given['base'])}' into a spec file, "
                         "or make a small spec with that base: line and your changes"])
    for key, value in given.items():
        if key in ("data.train", "data.eval", "eval.prompts", "output.dir") and isinstance(value, str):
            value = _anchor_paths({key.split(".")[0]: {key.split(".")[1]: value}}, cwd)[key.split(".")[0]][key.split(".")[1]]
        _set_path(raw, key, value)
        origin[key] = Path("command line")
    return build_spec(raw, origin, path, declared_output=_declared_output(path, overrides or []))


def build_spec(raw: Dict[str, Any], origin: Dict[str, Path], path: Path,
               declared_output: Optional[str] = None) -> JobSpec:
    """Check a merged raw tree against the schema; return a typed JobSpec or raise SpecError."""
    problems: List[Problem] = list(_unknown_keys(raw, JobSpec, ""))
    if isinstance(raw.get("lora"), dict) and isinstance(raw["lora"].get("target_modules"), str):
        raw["lora"]["target_modules"] = [raw["lora"]["target_modules"]]
    raw = _check_sweep_shape(raw, problems)
    cfg = OmegaConf.structured(JobSpec)
    bad_paths = {p for p, _ in problems}
    for key, value in _flatten(raw).items():
        if key in bad_paths or key.split(".")[0] in bad_paths:
            continue
        if _has_interpolation(value):
            problems.append((key, "interpolation (${...}) is not allowed in specs; write the value itself"))
            continue
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as e:
            problems.append((key, _omegaconf_message(e, value)))
    for key in sorted(OmegaConf.missing_keys(cfg)):
        if key not in {k for k, _ in problems}:
            problems.append((key, "is required but missing"))
        # A stand-in lets the range checks below still run, so every problem shows at once.
        OmegaConf.update(cfg, key, "_missing_", merge=False)
    spec = OmegaConf.to_object(cfg)
    reported = {key for key, _ in problems}
    typed_sweep: Dict[str, List[Any]] = {}
    later = [*spec.problems(), *_file_problems(spec, path, declared_output),
             *_sweep_problems(spec, path, declared_output, typed_sweep)]
    problems.extend((key, msg) for key, msg in later
                    if key not in reported and not any(key.startswith(r + ".") for r in reported))
    if not problems:
        spec.sweep = typed_sweep
        # The trial ids are part of what makes a spec runnable: unique, and short enough to
        # name folders. Imported here because the plan is built on this module.
        from qlora_ray.plan import plan_problems
        problems.extend(plan_problems(spec))
    if problems:
        raise SpecError([f"{_source(origin, key, path)}: {key}: {message}" for key, message in problems])
    return spec


def _check_sweep_shape(raw: Dict[str, Any], problems: List[Problem]) -> Dict[str, Any]:
    """``raw`` with a malformed sweep (or one over ``max_trials``) left out, its problems added."""
    sweep = raw.get("sweep")
    if sweep is not None and not isinstance(sweep, dict):
        problems.append(("sweep", "must be a mapping of spec path -> list of values"))
        return {k: v for k, v in raw.items() if k != "sweep"}
    if not sweep:
        return raw
    for key, values in sweep.items():
        if not isinstance(values, list) and not _is_distribution(values):
            problems.append((f"sweep.{show(key, 60)}", f"must be a list of values, e.g. [{show(values)}], or "
                                                       f"(search.method: random) one of {{{', '.join(f'{d}: [...]' for d in DISTRIBUTIONS)}}}"))
    lists = {k: v for k, v in sweep.items() if isinstance(v, list) or _is_distribution(v)}
    # Counted before any value is looked at, so a huge grid fails at once.
    trials = _planned_count(lists, raw.get("search") if isinstance(raw.get("search"), dict) else {})
    resources = raw.get("resources") if isinstance(raw.get("resources"), dict) else {}
    limit = resources.get("max_trials")
    limit = limit if isinstance(limit, int) and not isinstance(limit, bool) else _default("resources.max_trials")
    if trials > limit:
        shape = " x ".join(f"{show(k, 40)} {len(v):,}" for k, v in list(lists.items())[:6] if isinstance(v, list))
        problems.append(("sweep", f"plans {trials:,} trials ({shape}), over resources.max_trials ({limit:,}); sweep "
                                  "fewer values, or raise resources.max_trials in the spec if you mean it"))
        return {k: v for k, v in raw.items() if k != "sweep"}
    return {**raw, "sweep": lists}


def _is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def _planned_count(sweep: Dict[str, Any], search: Dict[str, Any]) -> int:
    """How many trials a raw sweep plans: the grid's product or random's num_samples, times seeds."""
    def number(key: str) -> int:
        value = search.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
            else _default(f"search.{key}")
    if search.get("method") == "random":
        configs = number("num_samples")
    else:
        configs = math.prod(len(v) for v in sweep.values() if isinstance(v, list))
    return configs * number("seeds")


def _default(key: str) -> Any:
    return leaf_paths()[key].default


def _omegaconf_message(e: OmegaConfBaseException, value: Any) -> str:
    first = show(str(e).splitlines()[0], 2 * SHOWN_CHARS)
    if "is not Optional" in first:
        return "must not be null; give a value or remove the key to use the default"
    if "could not be converted" in first or "Invalid value assigned" in first or "Value '" in first:
        return f"wrong type: {first}"
    return first


def _source(origin: Dict[str, Path], key: str, path: Path) -> str:
    for k in (key, key.split("[")[0], key.rsplit(".", 1)[0]):
        if k in origin:
            return str(origin[k])
    sweep_key = key[len("sweep."):] if key.startswith("sweep.") else None
    if sweep_key and "sweep" in origin:
        return str(origin["sweep"])
    return str(path)


def project_root(start: Path) -> Path:
    """The nearest folder above ``start`` holding pyproject.toml or .git (else ``start``)."""
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").exists() or (folder / ".git").exists():
            return folder
    return start


def _file_problems(spec: JobSpec, path: Path, declared: Optional[str]) -> Iterator[Problem]:
    for key in ("data.train", "data.eval", "data.test", "eval.control"):
        value = _get(spec, key)
        if not value or value == "_missing_" or value.startswith("hf://"):
            continue
        files = [f for f in glob.glob(value, recursive=True) if os.path.isfile(f)]
        if not files and not glob.glob(value):
            yield key, f"no file matches '{show(value)}'; check the path (relative paths are relative to the spec file)"
        elif files and all(os.path.getsize(f) == 0 for f in files):
            yield key, f"'{show(value)}' is empty; it must hold rows (one JSON object per line, or CSV/Parquet rows)"
    if spec.eval.prompts and not Path(spec.eval.prompts).is_file():
        yield "eval.prompts", f"file '{spec.eval.prompts}' not found"
    name = spec.model.name
    if (name.startswith(("/", ".")) or name.endswith(".gguf")) and not Path(name).exists():
        yield "model.name", f"local model '{name}' not found"
    out = spec.output.dir
    if not _is_uri(out):
        root = project_root(path.resolve().parent)
        if declared is not None and not Path(declared).is_absolute() and not Path(out).resolve().is_relative_to(root):
            yield "output.dir", f"'{declared}' climbs out of the project ({root}); use a path inside it, an absolute path or a storage URI"
        else:
            yield from _writable_folder_problems(Path(out))


def _writable_folder_problems(out: Path) -> Iterator[Problem]:
    """``output.dir`` must be a folder this user can write, or creatable in one."""
    if out.exists() and not out.is_dir():
        yield "output.dir", f"'{show(str(out))}' is a file, not a folder; point output.dir at a folder"
        return
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        yield "output.dir", f"'{show(str(existing))}' is a file, so '{show(str(out))}' cannot be created in it"
    elif not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == out else f"cannot be created: '{show(str(existing))}' is not writable"
        yield "output.dir", f"'{show(str(out))}' {what} by this user; choose another output.dir"


def _declared_output(path: Path, overrides: List[str]) -> Optional[str]:
    """The output.dir as written (command line first, then the spec chain), to tell relative from absolute."""
    given = parse_overrides(overrides).get("output.dir")
    if isinstance(given, str):
        return given
    for file in _chain_files(path):
        raw = _read_yaml(file)
        value = raw.get("output", {}).get("dir") if isinstance(raw.get("output"), dict) else None
        if isinstance(value, str):
            return value
    return None


def _chain_files(path: Path) -> List[Path]:
    files, current = [], path.resolve()
    while current is not None and current.is_file() and current not in files:
        files.append(current)
        base = _read_yaml(current).get("base")
        current = (current.parent / base).resolve() if isinstance(base, str) else None
    return files


SWEEPABLE_SECTIONS = tuple(n for n in _SECTION_NAMES.values() if n not in ("output", "search"))
VALUE_PROBLEMS_SHOWN = 5  # per sweep key; the rest are counted


def _sweep_problems(spec: JobSpec, path: Path, declared: Optional[str],
                    typed_sweep: Dict[str, List[Any]]) -> Iterator[Problem]:
    """Each swept value checked as its trial would be; fills ``typed_sweep`` with the typed values."""
    leaves = leaf_paths()
    for key, values in spec.sweep.items():
        where = f"sweep.{show(key, 60)}"
        if key not in leaves or key.split(".")[0] not in SWEEPABLE_SECTIONS:
            close = difflib.get_close_matches(str(key), list(leaves), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            yield where, f"'{show(key, 60)}' is not a spec path that can be swept{hint}"
            continue
        if isinstance(values, dict):
            yield from _distribution_problems(spec, key, values, path, declared, typed_sweep)
            continue
        if not values:
            yield where, "must list at least one value"
            continue
        typed, bad = [], 0
        for i, value in enumerate(values):
            problem, typed_value = _swept_value_problem(spec, key, value, path, declared)
            typed.append(typed_value)
            if problem is not None:
                bad += 1
                if bad <= VALUE_PROBLEMS_SHOWN:
                    yield f"{where}[{i}]", problem
        if bad > VALUE_PROBLEMS_SHOWN:
            yield where, f"{bad - VALUE_PROBLEMS_SHOWN:,} more values have problems"
        if bad:
            continue
        # Compared typed: 1.0e-4 and '1e-4' are the same trial twice.
        seen: Dict[str, int] = {}
        for i, value in enumerate(typed):
            if repr(value) in seen:
                yield f"{where}[{i}]", f"lists {show(value)} twice (also at [{seen[repr(value)]}])"
                break
            seen[repr(value)] = i
        typed_sweep[key] = typed


def _distribution_problems(spec: JobSpec, key: str, dist: Dict[str, Any], path: Path, declared: Optional[str],
                           typed_sweep: Dict[str, Any]) -> Iterator[Problem]:
    """A random-search distribution: its kind allowed here, its bounds or choices valid values of ``key``."""
    (kind, values), = dist.items()
    where = f"sweep.{show(key, 60)}.{kind}"
    if spec.search.method != "random":
        yield where, f"a distribution needs search.method: random (a grid sweeps lists); set it or list the values"
        return
    bounded = kind != "choice"
    if not isinstance(values, list) or not values or (bounded and len(values) != 2):
        yield where, "must be [low, high]" if bounded else "must be a non-empty list of values"
        return
    typed = []
    for i, value in enumerate(values):
        problem, typed_value = _swept_value_problem(spec, key, value, path, declared)
        if problem is None and bounded and (isinstance(typed_value, bool) or not isinstance(typed_value, (int, float))):
            problem = f"{kind} needs numbers, got {show(value)}"
        if problem is not None:
            yield f"{where}[{i}]", problem
            return
        typed.append(typed_value)
    if bounded and not typed[0] < typed[1]:
        yield where, f"low must be below high, got [{show(typed[0])}, {show(typed[1])}]"
    elif kind == "loguniform" and typed[0] <= 0:
        yield where, f"loguniform needs low > 0, got {show(typed[0])}"
    elif not bounded and len({repr(v) for v in typed}) < len(typed):
        yield where, "lists a value twice"
    else:
        typed_sweep[key] = {kind: typed}


def _swept_value_problem(spec: JobSpec, key: str, value: Any, path: Path,
                         declared: Optional[str]) -> tuple[Optional[str], Any]:
    """(what is wrong with ``value`` at ``key``, or None; the value as typed)."""
    try:
        trial = with_values(spec, {key: value})
    except OmegaConfBaseException as e:
        return _omegaconf_message(e, value), None
    found = list(trial.problems())
    if key in _PATH_KEYS:
        found += list(_file_problems(trial, path, declared))
    return next((message for where, message in found if where == key), None), _get(trial, key)


def _get(spec: Any, path: str) -> Any:
    for part in path.split("."):
        spec = getattr(spec, part)
    return spec


def to_yaml(spec: JobSpec) -> str:
    """The resolved spec as YAML (what is saved with every trial)."""
    return OmegaConf.to_yaml(OmegaConf.structured(spec))


def with_values(spec: JobSpec, values: Dict[str, Any]) -> JobSpec:
    """A copy of ``spec`` with dotted section paths set and typed (used for sweep trials); no
    sweep left in it. Only the touched sections go through the schema, so a trial costs the
    same however large the sweep is."""
    trial = copy.deepcopy(dataclasses.replace(spec, sweep={}))
    for key, value in values.items():
        section_name, leaf = key.split(".", 1)
        cfg = OmegaConf.structured(getattr(trial, section_name))
        OmegaConf.update(cfg, leaf, value, merge=False)
        setattr(trial, section_name, OmegaConf.to_object(cfg))
    return trial


def reference_markdown() -> str:
    """The spec reference table, generated from the schema (kept in README.md)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for path, f in leaf_paths().items():
        if f.default is not dataclasses.MISSING:
            default = "required" if f.default == MISSING else repr(f.default) if f.default is not None else "null"
        else:
            default = repr(f.default_factory())
        lines.append(f"| `{path}` | {default} | {f.metadata.get('help', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
