"""Periodic evaluation while a trial trains (``eval.every_steps``): eval perplexity on the eval
set's target tokens (or its first ``eval.periodic_max_examples`` examples) every N optimizer
steps and at the last step. The figure goes into the step's row of ``metrics.jsonl`` and to the
``report`` callable, so a Tune scheduler can stop a losing trial."""

from __future__ import annotations

import dataclasses
from typing import Optional

from qlora_ray import data
from qlora_ray.evaluate import perplexity
from qlora_ray.spec import EvalSpec


class PeriodicEval:
    """When to measure, and the (fixed) batches measured; off when ``every_steps`` is unset."""

    def __init__(self, spec: EvalSpec, prepared, total_steps: int):
        self.every, self.total = spec.every_steps, total_steps
        subset = prepared.eval[: spec.periodic_max_examples] if spec.periodic_max_examples else prepared.eval
        self.batches = data.eval_batches(dataclasses.replace(prepared, eval=subset), spec.batch_size) \
            if self.every and subset else None

    def due(self, step: int) -> bool:
        """Whether ``step`` (just taken) is an eval step."""
        return self.batches is not None and (step % self.every == 0 or step == self.total)

    def measure(self, model, dtype) -> Optional[float]:
        """Eval perplexity of ``model`` now (the model is left in the mode it was in)."""
        ppl, tokens = perplexity(model, self.batches, dtype)
        return ppl if tokens else None
