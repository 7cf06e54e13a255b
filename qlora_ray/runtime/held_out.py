"""After a sweep: the selected best trial measured once on the held-out test set (``data.test``).

The eval set picks the best trial; the test set, which neither training nor selection saw,
reports it. The measurement runs as a Ray task placed like a trial and becomes ``<exp>/test.json``;
it is repeated only when the best trial changed (a wider re-submit, another selection).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import ray

from qlora_ray import layout
from qlora_ray.records import TestFigures
from qlora_ray.runtime.experiment import reason
from qlora_ray.runtime.ray_compat import task_error_cause
from qlora_ray.spec import JobSpec
from qlora_ray.storage import Storage, local_mirror, read_leaderboard


def _test_task(exp: str, trial_id: str, batch_size: int) -> Optional[str]:
    from qlora_ray.sets import measure_test

    figures = measure_test(local_mirror(exp) / trial_id, trial_id, batch_size)
    return figures.to_json() if figures else None


def measure_best_on_test(spec: JobSpec, storage: Storage, say: Callable[[str], None]) -> None:
    """Measure the leaderboard's best trial on ``data.test`` (unless already measured) into ``test.json``."""
    if not spec.data.test:
        return
    best = read_leaderboard(storage.root).best
    if best is None:
        say("test set: no trial was selected as best, so nothing was measured on it")
        return
    done = storage.read_record(TestFigures, layout.TEST_FILE)
    if done is not None and done.trial_id == best.trial_id:
        return
    res = spec.resources
    options: Dict[str, Any] = {"num_cpus": res.cpus_per_trial, "num_gpus": res.gpus_per_trial, "max_retries": 1}
    if res.accelerator_type:
        options["accelerator_type"] = res.accelerator_type
    say(f"test set: measuring the best trial {best.trial_id} and its base on {spec.data.test} ...")
    ref = ray.remote(_test_task).options(**options).remote(storage.root, best.trial_id, spec.eval.batch_size)
    try:
        text = ray.get(ref)
    except ray.exceptions.RayError as e:
        say(f"test set: measuring failed ({reason(task_error_cause(e))}); the leaderboard has no test figures")
        return
    if text:
        storage.write_text(layout.TEST_FILE, text)
        say(f"test set: saved {storage.uri(layout.TEST_FILE)}")
