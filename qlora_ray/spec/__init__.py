"""The job spec: typed schema, strict loading, validation.

A spec is YAML data, never code: it is read with ``yaml.safe_load``, interpolations
(``${...}``) are refused, and every value is checked against the schema's dataclasses.
All problems are collected and raised together as one :class:`SpecError`.

- ``fields``: allowed values and bounds, the field helpers, problems and :class:`SpecError`;
- ``inputs`` (model, data, quantization, lora), ``training`` (train, eval) and ``running``
  (resources, search, results, tracking, output): one dataclass per section, with its checks;
- ``job``: :class:`JobSpec`, the checks across sections, ``to_yaml`` and ``with_values``;
- ``schema``: walking the schema (leaf paths, unknown keys, the README's reference table);
- ``paths``: paths anchored to their spec file and checked on disk;
- ``sweep``: the sweep's shape and every swept value checked as its trial would be;
- ``load``: ``load_spec`` (read, inherit, override) and ``build_spec`` (validate).

Everything below is imported from ``qlora_ray.spec``; ``python -m qlora_ray.spec`` prints the
reference table.
"""

from qlora_ray.spec.fields import (CHECKPOINTING, DATA_FORMATS, DISTRIBUTIONS, DTYPES, EVAL_KEEP, INT_MAX,
                                   MAX_NAME_BYTES, MAX_SEEDS, MAXIMA, MESSAGE_CHARS, MINIMA,
                                   NO_BF16_ACCELERATORS, OFFLINE_ALIASES, OPTIMIZERS, QUANT_MODES, RUNNERS,
                                   SCHEDULERS, SEARCH_METHODS, SEARCH_SCHEDULERS, SEED_MAX, SELECT_METRICS,
                                   SHOWN_CHARS, URI_SCHEMES, WANDB_MODES, HUB_OUTPUT, HUB_SCHEME, Problem,
                                   SpecError, show)
from qlora_ray.spec.inputs import DataSpec, LoraSpec, ModelSpec, QuantizationSpec
from qlora_ray.spec.training import EvalSpec, TrainSpec
from qlora_ray.spec.running import (MLflowSpec, OutputSpec, ResourcesSpec, ResultsSpec, SearchSpec,
                                    TrackingSpec, WandbSpec)
from qlora_ray.spec.job import JobSpec, name_problems, to_yaml, with_values
from qlora_ray.spec.schema import leaf_paths, reference_markdown
from qlora_ray.spec.paths import hub_output_problems, project_root
from qlora_ray.spec.sweep import SWEEPABLE_SECTIONS, VALUE_PROBLEMS_SHOWN
from qlora_ray.spec.load import build_spec, load_spec, parse_overrides

__all__ = [
    "CHECKPOINTING", "DATA_FORMATS", "DISTRIBUTIONS", "DTYPES", "EVAL_KEEP", "INT_MAX", "MAX_NAME_BYTES",
    "HUB_OUTPUT", "HUB_SCHEME", "MAX_SEEDS", "MAXIMA", "MESSAGE_CHARS", "MINIMA", "NO_BF16_ACCELERATORS", "OFFLINE_ALIASES", "OPTIMIZERS",
    "QUANT_MODES", "RUNNERS", "SCHEDULERS", "SEARCH_METHODS", "SEARCH_SCHEDULERS", "SEED_MAX", "SELECT_METRICS",
    "SHOWN_CHARS", "SWEEPABLE_SECTIONS", "URI_SCHEMES", "VALUE_PROBLEMS_SHOWN", "WANDB_MODES",
    "DataSpec", "EvalSpec", "JobSpec", "LoraSpec", "MLflowSpec", "ModelSpec", "OutputSpec", "QuantizationSpec",
    "ResourcesSpec", "ResultsSpec", "SearchSpec", "TrackingSpec", "TrainSpec", "WandbSpec",
    "Problem", "SpecError", "build_spec", "hub_output_problems", "leaf_paths", "load_spec", "name_problems", "parse_overrides",
    "project_root", "reference_markdown", "show", "to_yaml", "with_values",
]
