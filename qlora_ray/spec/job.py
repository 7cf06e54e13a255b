"""The whole job: :class:`JobSpec`, the checks across its sections, and copies of it (as YAML,
or with a trial's values set)."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional

from omegaconf import MISSING, OmegaConf

from qlora_ray.spec.fields import (INT_MAX, MAX_NAME_BYTES, MAXIMA, MINIMA, NO_BF16_ACCELERATORS, Problem,
                                   nested, setting, show)
from qlora_ray.spec.inputs import DataSpec, LoraSpec, ModelSpec, QuantizationSpec
from qlora_ray.spec.running import (MLflowSpec, OutputSpec, ResourcesSpec, ResultsSpec, SearchSpec,
                                    TrackingSpec, WandbSpec)
from qlora_ray.spec.training import EvalSpec, TrainSpec


@dataclass
class JobSpec:
    name: str = setting(MISSING, "Experiment name; names the output folder and the trial ids.")
    base: Optional[str] = setting(None, "Another spec file this one inherits from (relative to this file).")
    model: ModelSpec = nested(ModelSpec, "The base model.")
    data: DataSpec = nested(DataSpec, "Training and evaluation data.")
    quantization: QuantizationSpec = nested(QuantizationSpec, "How the frozen base is quantized.")
    lora: LoraSpec = nested(LoraSpec, "The LoRA adapters.")
    train: TrainSpec = nested(TrainSpec, "Optimization.")
    eval: EvalSpec = nested(EvalSpec, "Evaluation.")
    sweep: Dict[str, Any] = setting({}, "Dotted spec path -> list of values (grid: trials are the product), or with "
                                        "search.method random a distribution such as {loguniform: [1e-5, 1e-3]}.")
    resources: ResourcesSpec = nested(ResourcesSpec, "What each trial needs from the cluster.")
    output: OutputSpec = nested(OutputSpec, "Where results go.")
    search: SearchSpec = nested(SearchSpec, "How the sweep is searched and which trials are stopped early.")
    results: ResultsSpec = nested(ResultsSpec, "How the best trial is chosen.")
    tracking: TrackingSpec = nested(TrackingSpec, "Experiment trackers each trial logs to (MLflow, W&B, TensorBoard).")

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
            prefix = SECTION_NAMES[type(section)]
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


SECTION_NAMES = {ModelSpec: "model", DataSpec: "data", QuantizationSpec: "quantization",
                 LoraSpec: "lora", TrainSpec: "train", EvalSpec: "eval",
                 ResourcesSpec: "resources", OutputSpec: "output", ResultsSpec: "results",
                 TrackingSpec: "tracking", SearchSpec: "search"}
# Mappings nested inside a section, checked and flattened like the sections themselves.
SUBSECTIONS = {"tracking.mlflow": MLflowSpec, "tracking.wandb": WandbSpec}


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
