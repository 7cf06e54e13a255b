"""Choosing ``best`` (``results.select``, the forgetting guard), the control / quantization-cost
columns and the test section of the leaderboard, and the validation of the new spec keys.
Pure file work and spec parsing: no Ray, no torch."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from qlora_ray import results
from qlora_ray.select import Selection, choose, passed_over
from qlora_ray.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]


class Row:
    def __init__(self, trial_id, eval_ppl, control_change=None, status="finished"):
        self.trial_id, self.eval_ppl, self.control_change, self.status = trial_id, eval_ppl, control_change, status
        self.ppl_change, self.control_ppl = None, None


def test_lowest_metric_wins_without_a_guard():
    rows = [Row("a", 30.0, 2.0), Row("b", 20.0, 5.0), Row("c", 10.0, status="running")]
    best, skipped = choose(rows, Selection())
    assert best.trial_id == "b" and skipped == {}


def test_a_trial_that_forgets_is_passed_over_with_the_reason():
    rows = [Row("forgets", 10.0, 1.10), Row("keeps", 20.0, 0.05), Row("no_control", 5.0, None)]
    best, skipped = choose(rows, Selection(max_control_increase=0.10))
    assert best.trial_id == "keeps"
    assert "rose +110.0%" in skipped["forgets"] and "forgetting" in skipped["forgets"]
    assert "no control figures" in skipped["no_control"]
    assert passed_over(Row("edge", 1.0, 0.10), Selection(max_control_increase=0.10)) is None


def test_no_trial_passes_means_no_best():
    best, skipped = choose([Row("a", 10.0, 0.5)], Selection(max_control_increase=0.1))
    assert best is None and set(skipped) == {"a"}


def test_selection_from_the_plan():
    assert Selection.from_plan(None) == Selection()
    sel = Selection.from_plan({"select": "control_ppl", "max_control_increase": 0.2})
    assert sel == Selection("control_ppl", 0.2) and "20%" in sel.describe()


def _experiment(tmp_path: Path, select: dict | None) -> Path:
    exp = tmp_path / "exp"
    exp.mkdir()
    trials = {"exp-lr1": (20.0, 62.0, 0.03), "exp-lr9": (12.0, 130.0, 1.17)}
    plan = {"name": "exp", "sweep_keys": ["train.lr"], "select": select,
            "trials": [{"id": tid, "values": {"train.lr": i}} for i, tid in enumerate(trials)]}
    (exp / "experiment.json").write_text(json.dumps(plan))
    for i, (tid, (ppl, control, change)) in enumerate(trials.items()):
        folder = exp / tid
        folder.mkdir()
        final = {"step": 4, "eval_ppl": ppl, "base_ppl": 40.0, "ppl_change": ppl / 40 - 1,
                 "control_base_ppl": 60.0, "control_ppl": control, "control_change": change,
                 "base_ppl_unquantized": 30.0, "change_vs_unquantized": ppl / 30 - 1}
        (folder / "result.json").write_text(json.dumps({"final": final}))
        (folder / "status.json").write_text(json.dumps({"trial_id": tid, "values": {"train.lr": i},
                                                        "status": "finished"}))
        (folder / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 2.0}) + "\n")
    return exp


def test_leaderboard_columns_selection_and_test_section(tmp_path):
    exp = _experiment(tmp_path, {"select": "eval_ppl", "max_control_increase": 0.10})
    (exp / "test.json").write_text(json.dumps({"trial_id": "exp-lr1", "data": "test.jsonl", "base_ppl": 41.0,
                                               "tuned_ppl": 21.0, "change": 21 / 41 - 1, "target_tokens": 900}))
    board = results.write_leaderboard(exp)
    assert board.best.trial_id == "exp-lr1"
    assert (exp / "best").resolve().name == "exp-lr1"
    md = (exp / "leaderboard.md").read_text()
    for header in ("control base", "control tuned", "control change", "change vs unquantized"):
        assert f"| {header} |" in md or f" {header} |" in md
    assert "+117.0%" in md and "## Passed over" in md and "`exp-lr9`: control perplexity rose" in md
    assert "## Test set" in md and "| exp-lr1 | test.jsonl | 41.00 | 21.00 | -48.8% | 900 |" in md
    assert "Quantization cost" in md and "30.00" in md
    # The selected trial ranks first although the other has the lower eval perplexity.
    assert md.index("| 1 | exp-lr1 |") > 0
    rows = list(csv.DictReader(io.StringIO((exp / "leaderboard.csv").read_text())))
    assert {"control_base_ppl", "control_ppl", "control_change", "change_vs_unquantized", "passed_over"} <= set(rows[0])
    data = json.loads((exp / "leaderboard.json").read_text())
    assert data["best"] == "exp-lr1" and data["test"]["tuned_ppl"] == 21.0
    assert data["selection"] == {"metric": "eval_ppl", "max_control_increase": 0.1}
    assert data["trials"][1]["passed_over"].startswith("control perplexity rose")
    assert (exp / "leaderboard.png").stat().st_size > 0


def test_without_a_guard_the_lowest_eval_wins_and_a_stale_test_is_flagged(tmp_path):
    exp = _experiment(tmp_path, None)
    (exp / "test.json").write_text(json.dumps({"trial_id": "exp-lr1", "data": "t", "tuned_ppl": 1.0}))
    board = results.write_leaderboard(exp, with_plot=False)
    assert board.best.trial_id == "exp-lr9"
    md = (exp / "leaderboard.md").read_text()
    assert "Passed over" not in md and "no longer the best trial" in md


def test_spec_keys_are_validated():
    job = ROOT / "jobs" / "hinglish_r16.yaml"
    spec = load_spec(job)
    assert spec.eval.control.endswith("data/control/chat_en.jsonl") and spec.data.test.endswith("test.jsonl")
    bad = {"results.select=loss": "results.select: 'loss' is not one of",
           "results.max_control_increase=-1": "must be >= 0",
           "lora.init=pissa": "rewrites the base weights",
           "lora.init=magic": "not an initialisation the installed peft offers",
           "eval.control=nowhere.jsonl": "eval.control: no file matches",
           "data.max_test_examples=0": "must be >= 1"}
    for override, message in bad.items():
        with pytest.raises(SpecError) as e:
            load_spec(job, [override])
        assert message in str(e.value), (override, str(e.value))
    with pytest.raises(SpecError, match="needs a control set"):
        load_spec(job, ["eval.control=null", "results.max_control_increase=0.1"])
    with pytest.raises(SpecError, match="loftq"):
        load_spec(job, ["lora.init=loftq", "quantization.mode=none"])
    assert load_spec(job, ["lora.init=gaussian"]).lora.init == "gaussian"
