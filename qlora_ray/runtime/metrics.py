"""Per-trial gauges for the Ray dashboard's Metrics view (and any Prometheus scraping Ray).

The trial's ``report`` callable (``trial._Reporter``) sets them from each reported step, and the
trial sets the final eval perplexity. Each gauge is tagged with the trial id and the job name;
Ray's metrics agent on the trial's node exports them on its metrics port, as
``ray_qlora_ray_<name>`` in Prometheus terms.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional

log = logging.getLogger(__name__)

TAG_KEYS = ("trial_id", "job")
# gauge name -> (the report's key, description)
GAUGES = {
    "qlora_ray_tokens_per_s": ("tokens_per_s", "Trained (non-padding) tokens per second over the last logged steps."),
    "qlora_ray_loss": ("loss", "Training loss over the last logged steps (per target token)."),
    "qlora_ray_eval_ppl": ("eval_ppl", "Eval perplexity: the latest periodic evaluation, then the final one."),
    "qlora_ray_step": ("step", "Optimizer steps done."),
    "qlora_ray_gpu_memory_gib": ("peak_mem_gb", "Peak GPU memory of the trial in GiB (peak RSS on a CPU)."),
}
_made: Dict[str, Any] = {}  # gauges are per process; Tune reuses trial processes, so made once


def _gauge(name: str):
    if name not in _made:
        from ray.util.metrics import Gauge

        _made[name] = Gauge(name, description=GAUGES[name][1], tag_keys=TAG_KEYS)
    return _made[name]


class TrialGauges:
    """The gauges of one trial; :meth:`update` takes a report's metrics (missing keys are left as they are)."""

    def __init__(self, trial_id: str, job: str):
        self.tags = {"trial_id": trial_id, "job": job}
        self.broken = False

    def update(self, metrics: Dict[str, Any]) -> None:
        if self.broken:
            return
        try:
            for name, (key, _) in GAUGES.items():
                value = metrics.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    _gauge(name).set(float(value), tags=self.tags)
        except Exception as e:  # noqa: BLE001 (a metrics agent that is not there never fails training)
            self.broken = True
            log.warning("dashboard metrics off for %s: %s", self.tags["trial_id"], e)

    def final(self, eval_ppl: Optional[float]) -> None:
        """The finished trial's eval perplexity."""
        self.update({"eval_ppl": eval_ppl})
