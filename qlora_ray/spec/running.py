"""The sections that say how the sweep runs and is judged: resources, search, results, the
experiment trackers and the output folder."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Iterator, Optional

from qlora_ray.spec.fields import (MAX_SEEDS, RUNNERS, SEARCH_METHODS, SEARCH_SCHEDULERS, SEED_MAX,
                                   SELECT_METRICS, WANDB_MODES, Problem, nested, one_of, setting)


@dataclass
class ResourcesSpec:
    gpus_per_trial: float = setting(1.0, "GPUs per trial worker: 0 trains on the CPU; a fraction such as 0.25 runs "
                                         "several trials on one GPU, each capped at that share of its memory.")
    cpus_per_trial: float = setting(1.0, "CPUs per trial worker.")
    accelerator_type: Optional[str] = setting(None, "Ray accelerator type the worker needs, e.g. T4, A100.")
    max_concurrent_trials: int = setting(0, "Trials run at once; 0 picks from the cluster's GPUs (or CPUs).")
    max_failures: int = setting(2, "Retries per trial after a worker dies; each resumes from its last checkpoint.")
    max_trials: int = setting(1000, "Refuse a sweep of more trials than this (a guard against a mistyped grid).")
    runner: str = setting("train", "How a trial runs: train (a Ray Train TorchTrainer with one worker; Train "
                                   "restarts a dead worker) or tune (the trial's Tune process trains itself; Tune "
                                   "restarts it). tune starts each trial about 20 s sooner: for short trials and "
                                   "dense sweeps.")
    time_budget: Optional[str] = setting(None, "Wall time a submit may use, from its start (e.g. 11h30m for a Kaggle "
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
        yield from one_of("runner", self.runner, RUNNERS)
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


@dataclass
class SearchSpec:
    scheduler: str = setting("none", "Stop losing trials early on their periodic eval perplexity (needs eval.every_steps): "
                                     "none, asha (Tune's asynchronous successive halving) or median (stop a trial "
                                     "worse than the median of the others at the same step). A stopped trial is "
                                     "'pruned': it keeps its last checkpoint and adapter, and a re-submit leaves it.")
    grace_period: Optional[int] = setting(None, "Optimizer steps every trial runs before it may be stopped "
                                                "(default: eval.every_steps).")
    reduction_factor: float = setting(2.0, "asha: the share of trials kept at each rung is 1 / reduction_factor.")
    method: str = setting("grid", "grid (every combination of the sweep's lists) or random (num_samples draws; a "
                                  "sweep key may then be a distribution: {loguniform: [low, high]}, {uniform: [low, "
                                  "high]} or {choice: [values]}; a list is a choice).")
    num_samples: int = setting(10, "random: how many configurations are drawn.")
    seed: int = setting(0, "random: seed of the draws; the same seed draws the same trials (and trial ids), so a "
                           "re-submit resumes them, and a larger num_samples keeps the first draws.")
    seeds: int = setting(1, "Run each configuration with this many values of train.seed (train.seed, +1, ...); the "
                            "leaderboard shows mean and spread per configuration.")

    def problems(self) -> Iterator[Problem]:
        yield from one_of("scheduler", self.scheduler, SEARCH_SCHEDULERS)
        if self.grace_period is not None and self.grace_period < 1:
            yield "grace_period", f"must be >= 1 when set, got {self.grace_period}"
        if not 1.0 < self.reduction_factor <= 100:
            yield "reduction_factor", f"must be in (1, 100], got {self.reduction_factor}"
        yield from one_of("method", self.method, SEARCH_METHODS)
        if self.num_samples < 1:
            yield "num_samples", f"must be >= 1, got {self.num_samples}"
        if not 0 <= self.seed <= SEED_MAX:
            yield "seed", f"must be in [0, {SEED_MAX}], got {self.seed}"
        if not 1 <= self.seeds <= MAX_SEEDS:
            yield "seeds", f"must be in [1, {MAX_SEEDS}], got {self.seeds}"


@dataclass
class ResultsSpec:
    select: str = setting("eval_ppl", "What picks the best trial (lowest wins): eval_ppl, ppl_change or control_ppl.")
    max_control_increase: Optional[float] = setting(None, "Pass over a trial whose control perplexity rose by more "
                                                          "than this fraction (0.10 = 10%); needs eval.control.")

    def problems(self) -> Iterator[Problem]:
        yield from one_of("select", self.select, SELECT_METRICS)
        if self.max_control_increase is not None and self.max_control_increase < 0:
            yield "max_control_increase", f"must be >= 0 when set, got {self.max_control_increase}"


@dataclass
class MLflowSpec:
    tracking_uri: Optional[str] = setting(None, "MLflow tracking URI (a server such as http://127.0.0.1:5000, or a local "
                                                "store such as file:./mlruns); set it to log each trial as an MLflow run. "
                                                "Needs pip install 'qlora-ray[mlflow]'.")
    experiment: Optional[str] = setting(None, "MLflow experiment the runs go to; null: the job's name.")


@dataclass
class WandbSpec:
    project: Optional[str] = setting(None, "Weights & Biases project; set it to log each trial as a W&B run. "
                                           "Needs pip install 'qlora-ray[wandb]'.")
    mode: str = setting("offline", "offline (files under the experiment folder; `wandb sync` uploads them later) "
                                   "or online.")


@dataclass
class TrackingSpec:
    tensorboard: bool = setting(False, "TensorBoard event files, one folder per trial under <experiment>/tensorboard/. "
                                       "Needs pip install 'qlora-ray[tensorboard]' (tensorboardX; Ray ships it).")
    mlflow: MLflowSpec = nested(MLflowSpec, "MLflow: one run per trial.")
    wandb: WandbSpec = nested(WandbSpec, "Weights & Biases: one run per trial.")

    def problems(self) -> Iterator[Problem]:
        yield from one_of("wandb.mode", self.wandb.mode, WANDB_MODES)
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
    dir: str = setting("runs", "Where experiments are written: a path (relative to the spec), a storage URI (s3://, "
                               "gs://), or a Hugging Face Hub folder (hf://datasets/<user>/<repo>[/sub] or "
                               "hf://buckets/<user>/<bucket>[/sub]) mirrored from a local staging folder.")
