"""``resources.time_budget``: durations, the loop stopping at a checkpoint when time is up, and a
sweep through a real local Ray that ends with exit 3 and resumes on the next submit.

Time is not waited for: a budget of one second is spent before any trial trains, so every trial
trains exactly its one guaranteed step, checkpoints and stops. The assertions are on steps and
statuses, never on the clock."""

from __future__ import annotations

import json

import pytest

from qlora_ray import layout, train
from qlora_ray.budget import TIME_BUDGET, Deadline, parse_duration
from qlora_ray.spec import SpecError, load_spec

from test_runtime import _out, _rows, _submit


@pytest.mark.parametrize("text, seconds", [("11h30m", 41400), ("90s", 90), ("1.5h", 5400), ("45m", 2700),
                                           ("600", 600), ("1d", 86400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "1h1h", "0s", "10 minutes", "-5s"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_a_bad_budget_is_a_spec_error(tiny_spec_file):
    with pytest.raises(SpecError, match=r"resources\.time_budget: '11 hours' is not a duration; write it like 11h30m"):
        load_spec(tiny_spec_file, ["resources.time_budget=11 hours"])


def test_deadline_asks_for_a_step_and_a_checkpoint():
    import time

    deadline = Deadline.after("1h", time.time())
    assert not deadline.should_stop(60.0) and deadline.should_stop(3601.0)
    assert Deadline.after(None, 0.0) is None


def test_the_loop_checkpoints_and_stops_then_resumes_without_repeating_a_step(tiny_spec_file, tmp_path):
    spec = load_spec(tiny_spec_file)
    folder = tmp_path / "trial"
    margins = []

    def time_is_up(margin: float) -> bool:
        margins.append(margin)
        return len(margins) >= 2  # after the second step

    reports = []
    with pytest.raises(train.Stopped, match=TIME_BUDGET):
        train.fit(spec, lambda m, c: reports.append((m["step"], c)), train.RunContext(
            trial_dir=str(folder), should_stop=time_is_up))
    assert all(m > 0 for m in margins)
    # Step 2 is logged and checkpointed although checkpoint_every is 3, and that checkpoint is reported.
    assert reports == [(1, None), (2, str(folder / layout.CHECKPOINTS_DIR / "step_2"))]
    assert train.latest_checkpoint(folder).name == "step_2"
    assert not (folder / layout.RESULT_FILE).exists()

    result = train.fit(spec, lambda m, c: None, train.RunContext(
        trial_dir=str(folder), resume_from=str(train.latest_checkpoint(folder)), should_stop=lambda m: False))
    assert result.step == 6
    assert [r["step"] for r in _rows(folder / layout.METRICS_FILE)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.ray
def test_a_sweep_out_of_time_exits_3_and_the_next_submit_finishes_it(tiny_spec_file):
    exp = tiny_spec_file.parent / "runs" / "tiny"
    args = ["sweep={lora.r: [2, 4]}", "--no-dashboard"]
    proc = _submit(tiny_spec_file, *args, "resources.time_budget=1s")
    assert proc.returncode == 3, _out(proc)
    assert "time budget spent: 2 trial(s) saved a checkpoint and stopped. Resume with:" in proc.stderr
    assert f"qlora-ray submit {tiny_spec_file} 'sweep={{lora.r: [2, 4]}}' --no-dashboard resources.time_budget=1s" \
        in proc.stderr
    board = json.loads((exp / "leaderboard.json").read_text())
    assert {t["status"] for t in board["trials"]} == {"stopped"}
    assert {t["reason"] for t in board["trials"]} == {TIME_BUDGET}
    for tid in ("tiny-r2", "tiny-r4"):
        assert [r["step"] for r in _rows(exp / tid / layout.METRICS_FILE)] == [1]
        assert train.latest_checkpoint(exp / tid).name == "step_1"

    again = _submit(tiny_spec_file, *args)  # the next session: no budget left over from the last
    assert again.returncode == 0, _out(again)
    board = json.loads((exp / "leaderboard.json").read_text())
    assert {t["status"] for t in board["trials"]} == {"finished"}
    for tid in ("tiny-r2", "tiny-r4"):
        assert [r["step"] for r in _rows(exp / tid / layout.METRICS_FILE)] == [1, 2, 3, 4, 5, 6]
        starts = _rows(exp / tid / layout.EVENTS_FILE)
        assert len(starts) == 2 and starts[1]["resume_from"]
