"""After a sweep: the selected best trial measured once on the held-out test set (``data.test``).

The eval set picks the best trial; the test set, which neither training nor selection saw,
reports it. The measurement runs as a Ray task placed like a trial and becomes ``<exp>/test.json``;
it is repeated only when the best trial changed (a wider re-submit, another selection).
"""

from __future__ import annotations

from typing import Callable, Optional

import ray

from qlora_ray import layout
from qlora_ray.records import TestFigures
from qlora_ray.runtime.experiment import reason
from qlora_ray.runtime.placement import ResourcesUnavailable, run_reserved
from qlora_ray.runtime.ray_compat import task_error_cause
from qlora_ray.spec import JobSpec
from qlora_ray.storage import Storage, local_mirror, read_leaderboard


def _test_task(exp: str, trial_id: str, batch_size: int) -> Optional[str]:
    from qlora_ray.sets import measure_test

    figures = measure_test(local_mirror(exp) / trial_id, trial_id, batch_size)
    return figures.to_json() if figures else None


def _measured(storage: Storage, trial_id: str) -> bool:
    done = storage.read_record(TestFigures, layout.TEST_FILE)
    return done is not None and done.trial_id == trial_id


def unmeasured_on_test(spec: JobSpec, storage: Storage) -> bool:
    """Whether the spec has a test set and the leaderboard's best trial is not measured on it yet."""
    if not spec.data.test:
        return False
    best = read_leaderboard(storage.root).best
    return best is not None and not _measured(storage, best.trial_id)


def measure_best_on_test(spec: JobSpec, storage: Storage, say: Callable[[str], None]) -> None:
    """Measure the leaderboard's best trial on ``data.test`` (unless already measured) into ``test.json``."""
    if not spec.data.test:
        return
    best = read_leaderboard(storage.root).best
    if best is None:
        say("test set: no trial was selected as best, so nothing was measured on it")
        return
    if _measured(storage, best.trial_id):
        return
    say(f"test set: measuring the best trial {best.trial_id} and its base on {spec.data.test} ...")
    try:
        text = run_reserved(_test_task, (storage.root, best.trial_id, spec.eval.batch_size), spec.resources,
                            "test set", say)
    except ResourcesUnavailable as e:
        say(f"{e}\ntest set: not measured; the leaderboard has no test figures until a submit measures it")
        return
    except ray.exceptions.RayError as e:
        say(f"test set: measuring failed ({reason(task_error_cause(e))}); the leaderboard has no test figures")
        return
    if text:
        storage.write_text(layout.TEST_FILE, text)
        say(f"test set: saved {storage.uri(layout.TEST_FILE)}")
