"""The search section and random search, no Ray: strict validation of schedulers, eval.keep and
distributions; random draws and seeds give stable, unique trial ids; the Tune scheduler built
from a spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qlora_ray.plan import expand, trial_ids
from qlora_ray.spec import SpecError, load_spec


def _spec(tmp_path: Path, **sections) -> Path:
    (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n')
    data = {"name": "t", "model": {"name": "org/model"}, "data": {"train": "train.jsonl"}, **sections}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


BAD = [  # (id, sections, key the message names, phrase)
    ("scheduler without periodic eval", {"search": {"scheduler": "asha"}}, "search.scheduler",
     "eval.every_steps is not set"),
    ("median without periodic eval", {"search": {"scheduler": "median"}}, "search.scheduler",
     "eval.every_steps is not set"),
    ("unknown scheduler", {"search": {"scheduler": "hyperband"}, "eval": {"every_steps": 5}}, "search.scheduler",
     "not one of none, asha, median"),
    ("reduction factor one", {"search": {"scheduler": "asha", "reduction_factor": 1}, "eval": {"every_steps": 5}},
     "search.reduction_factor", "(1, 100]"),
    ("keep best without periodic eval", {"eval": {"keep": "best"}}, "eval.keep", "eval.every_steps is not set"),
    ("keep typo", {"eval": {"keep": "top"}}, "eval.keep", "not one of last, best"),
    ("every_steps zero", {"eval": {"every_steps": 0}}, "eval.every_steps", ">= 1"),
    ("distribution in a grid", {"sweep": {"train.lr": {"loguniform": [1e-5, 1e-3]}}}, "sweep.train.lr.loguniform",
     "needs search.method: random"),
    ("loguniform from zero", {"sweep": {"lora.dropout": {"loguniform": [0.0, 0.1]}}, "search": {"method": "random"}},
     "sweep.lora.dropout.loguniform", "low > 0"),
    ("bounds reversed", {"sweep": {"train.lr": {"uniform": [1e-3, 1e-5]}}, "search": {"method": "random"}},
     "sweep.train.lr.uniform", "low must be below high"),
    ("bound out of range", {"sweep": {"train.lr": {"uniform": [1e-5, 2.0]}}, "search": {"method": "random"}},
     "sweep.train.lr.uniform[1]", "(0, 1)"),
    ("unknown distribution", {"sweep": {"train.lr": {"normal": [1e-4, 1e-5]}}, "search": {"method": "random"}},
     "sweep.train.lr", "loguniform"),
    ("random without sweep", {"search": {"method": "random"}}, "search.method", "sweep is empty"),
    ("seeds and a swept seed", {"sweep": {"train.seed": [1, 2]}, "search": {"seeds": 3}}, "search.seeds",
     "cannot also be swept"),
    ("space too small", {"sweep": {"lora.r": [8, 16]}, "search": {"method": "random", "num_samples": 5}},
     "search.num_samples", "only 2 distinct configurations"),
    ("too many trials", {"sweep": {"lora.r": [8, 16]}, "search": {"seeds": 600}}, "sweep",
     "plans 1,200 trials"),
]


@pytest.mark.parametrize("sections,key,phrase", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_search_specs_name_the_key(tmp_path, sections, key, phrase):
    with pytest.raises(SpecError) as e:
        load_spec(_spec(tmp_path, **sections))
    text = "\n".join(e.value.problems)
    assert f": {key}: " in text and phrase in text, text


def test_random_search_ids_are_stable_unique_and_grow_with_num_samples(tmp_path):
    sweep = {"train.lr": {"loguniform": [1e-5, 1e-3]}, "lora.r": [8, 16, 32], "lora.alpha": {"uniform": [8, 64]}}
    path = _spec(tmp_path, sweep=sweep, search={"method": "random", "num_samples": 6, "seed": 7})
    first, again = expand(load_spec(path)), expand(load_spec(path))
    ids = [t.id for t in first]
    assert ids == [t.id for t in again] == trial_ids(load_spec(path))
    assert len(set(ids)) == 6 and all(i.startswith("t-lr") for i in ids)
    for trial in first:
        assert 1e-5 <= trial.spec.train.lr <= 1e-3 and trial.spec.lora.r in (8, 16, 32)
        assert isinstance(trial.spec.lora.alpha, int) and 8 <= trial.spec.lora.alpha <= 64
        assert trial.values == {"train.lr": trial.spec.train.lr, "lora.r": trial.spec.lora.r,
                                "lora.alpha": trial.spec.lora.alpha}
    # More samples keep the first draws; another seed draws others.
    more = [t.id for t in expand(load_spec(path, ["search.num_samples=9"]))]
    assert more[:6] == ids and len(set(more)) == 9
    assert [t.id for t in expand(load_spec(path, ["search.seed=8"]))] != ids


def test_seeds_repeat_each_configuration(tmp_path):
    path = _spec(tmp_path, sweep={"lora.r": [8, 16]}, search={"seeds": 3}, train={"seed": 10})
    trials = expand(load_spec(path))
    assert [t.id for t in trials] == [f"t-r{r}_seed{s}" for r in (8, 16) for s in (10, 11, 12)]
    assert [t.spec.train.seed for t in trials] == [10, 11, 12] * 2
    # Without a sweep, seeds alone still make trials.
    alone = expand(load_spec(_spec(tmp_path, search={"seeds": 2})))
    assert [t.id for t in alone] == ["t-seed42", "t-seed43"]


def test_plain_grid_ids_are_unchanged(tmp_path):
    path = _spec(tmp_path, sweep={"lora.r": [8, 16], "train.lr": [1e-4, 2e-4]})
    assert [t.id for t in expand(load_spec(path))] == ["t-r8_lr1e-4", "t-r8_lr2e-4", "t-r16_lr1e-4", "t-r16_lr2e-4"]


def test_scheduler_from_the_spec(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    from qlora_ray.runtime.pruning import build_scheduler

    path = _spec(tmp_path, eval={"every_steps": 5}, train={"max_steps": 40},
                 search={"scheduler": "asha", "reduction_factor": 3})
    asha = build_scheduler(load_spec(path), str(tmp_path))
    assert isinstance(asha, ASHAScheduler)
    assert (asha._metric, asha._mode, asha._time_attr, asha._max_t) == ("eval_ppl", "min", "step", 40)
    assert [m for m, _ in asha._brackets[0]._rungs] == [15, 5]  # grace 5 (every_steps) x 3^k below 40
    median = build_scheduler(load_spec(path, ["search.scheduler=median", "search.grace_period=10"]), str(tmp_path))
    assert isinstance(median, MedianStoppingRule) and median._grace_period == 10
    assert build_scheduler(load_spec(_spec(tmp_path)), str(tmp_path)) is None


def test_a_pruned_trial_stays_pruned_whatever_its_dying_driver_reports(tmp_path):
    from qlora_ray.records import TrialResult
    from qlora_ray.runtime import experiment
    from qlora_ray.storage import Storage

    trial = expand(load_spec(_spec(tmp_path, sweep={"lora.r": [8]})))[0]
    storage = Storage(str(tmp_path / "exp"))
    run = experiment.mark_running(storage, trial)
    experiment.mark_pruned(storage, trial.id, 4, 51.5, by="asha")
    # The stop takes the trial's TorchTrainer down; its function may still see that as an error.
    status = experiment.mark_ended(storage, run, TrialResult(), "RayActorError: the actor died")
    assert (status.status.value, status.pruned_step, status.pruned_eval_ppl) == ("pruned", 4, 51.5)
    assert experiment.trial_status(storage, trial.id).reason == "stopped by asha at step 4"
    assert experiment.is_finished(storage, trial.id)  # a re-submit leaves it
