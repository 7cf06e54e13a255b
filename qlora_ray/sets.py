"""The sets a trial is measured on besides the eval set, and the unquantized base.

- control (``eval.control``): what the model should not forget (general chat). Measured base
  vs tuned on the same target tokens in every trial, so a gain bought by forgetting shows.
- test (``data.test``): held out from training and selection; measured for the selected best
  trial only (``qlora_ray.adapters.evaluate_adapter``), reported apart from the eval figures.
- unquantized base (``eval.quantization_cost``): the base model without quantization on the
  eval set, so a trial's gain is also stated against the model a user would otherwise run.

Every base figure goes through the base-figure cache (``qlora_ray.base_cache``): its key holds
the tokenized examples and the quantization, so each variant is measured once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

from qlora_ray import data
from qlora_ray.base_cache import base_key, cached
from qlora_ray.records import Baseline
from qlora_ray.spec import DataSpec, JobSpec


def side_data(spec: JobSpec, source: str, max_examples: Optional[int], fmt: Optional[str] = None) -> DataSpec:
    """A DataSpec reading ``source`` as an eval split, tokenized as the spec's data (unpacked)."""
    if not source.startswith("hf://"):
        source = os.path.abspath(os.path.expanduser(source))
    d = spec.data
    return DataSpec(train=source, eval=source, format=fmt or d.format, packing=False, max_seq_len=d.max_seq_len,
                    chat_template=d.chat_template, train_on_prompt=d.train_on_prompt, max_train_examples=1,
                    max_eval_examples=max_examples, seed=d.seed, cache_dir=d.cache_dir)


def control_data(spec: JobSpec) -> Optional[DataSpec]:
    """The control set's DataSpec, or None when the spec has none."""
    if not spec.eval.control:
        return None
    # Control sets are chat conversations whatever the training data's format.
    return side_data(spec, spec.eval.control, spec.eval.max_control_examples, fmt="auto")


def test_data(spec: JobSpec) -> Optional[DataSpec]:
    """The test set's DataSpec, or None when the spec has none."""
    if not spec.data.test:
        return None
    return side_data(spec, spec.data.test, spec.data.max_test_examples)


def base_perplexity(spec: JobSpec, tokenizer, prepared, device, measure: Callable[[], Baseline]) -> Baseline:
    """The base model's perplexity on ``prepared.eval``: from the base-figure cache, else
    ``measure()`` once (a Baseline with perplexity and target tokens only)."""
    spec = dataclasses.replace(spec, eval=dataclasses.replace(spec.eval, perplexity=True))
    return cached(base_key(spec, tokenizer, prepared, device, prompts=()), measure)


def unquantized(spec: JobSpec) -> JobSpec:
    """``spec`` with its base model unquantized (same compute dtype rule)."""
    return dataclasses.replace(spec, quantization=dataclasses.replace(spec.quantization, mode="none",
                                                                       double_quant=False))


def measures_quantization_cost(spec: JobSpec) -> bool:
    return spec.eval.quantization_cost and spec.eval.perplexity and spec.quantization.mode != "none"


def unquantized_base(spec: JobSpec, tokenizer, prepared, device) -> Optional[float]:
    """The unquantized base model's eval perplexity: cached, else loaded once and measured."""
    if not measures_quantization_cost(spec) or not prepared.eval:
        return None
    full = unquantized(spec)

    def measure_now() -> Baseline:
        import gc

        from qlora_ray.evaluate import perplexity
        from qlora_ray.model import load_base

        loaded = load_base(full, device=device)
        try:
            ppl, tokens = perplexity(loaded.model, data.eval_batches(prepared, spec.eval.batch_size),
                                     loaded.compute_dtype)
        finally:
            del loaded
            gc.collect()
        return Baseline(perplexity=ppl, target_tokens=tokens)

    return base_perplexity(full, tokenizer, prepared, device, measure_now).perplexity


@dataclasses.dataclass
class ControlFigures:
    base_ppl: float
    tuned_ppl: float
    tokens: int

    @property
    def change(self) -> float:
        return self.tuned_ppl / self.base_ppl - 1.0


def measure_control(model, tokenizer, spec: JobSpec, dtype, device) -> Optional[ControlFigures]:
    """The peft ``model`` and its base (adapter switched off, or the cache) on the control set."""
    from qlora_ray.evaluate import perplexity
    from qlora_ray.model import lora_folded_in

    dspec = control_data(spec)
    if dspec is None:
        return None
    prepared = data.prepare(dspec, tokenizer)
    batches = data.eval_batches(prepared, spec.eval.batch_size)

    def measure_base() -> Baseline:
        with model.disable_adapter():
            ppl, tokens = perplexity(model, batches, dtype)
        return Baseline(perplexity=ppl, target_tokens=tokens)

    base = base_perplexity(spec, tokenizer, prepared, device, measure_base)
    with lora_folded_in(model):
        tuned, tokens = perplexity(model, batches, dtype)
    return ControlFigures(base_ppl=base.perplexity, tuned_ppl=tuned, tokens=tokens)


def measure_test(trial_dir, trial_id: str, batch_size: int = 8) -> Optional["TestFigures"]:
    """The adapter of ``trial_dir`` and its base on the test set its spec names (None: no test set)."""
    from qlora_ray.adapters import evaluate_adapter
    from qlora_ray.model import adapter_spec, find_adapter
    from qlora_ray.records import TestFigures

    spec = adapter_spec(find_adapter(trial_dir))
    if not spec.data.test:
        return None
    result = evaluate_adapter(trial_dir, test_data, batch_size)
    return TestFigures(trial_id=trial_id, data=spec.data.test, base_ppl=result.base_ppl,
                       tuned_ppl=result.tuned_ppl, change=result.ppl_change,
                       target_tokens=result.target_tokens, examples=result.examples)
