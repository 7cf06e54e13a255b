"""``qlora-ray submit`` through a REAL local Ray with a control set, a test set and a forgetting
guard: every trial carries control figures, only the selected trial is measured on the test
set (``test.json``), and the leaderboard reports it apart. Marked ``ray`` (slow on 2 cores)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_runtime import _out, _submit  # noqa: E402


@pytest.mark.ray
def test_submit_measures_control_every_trial_and_test_for_the_best(tiny_spec_file, tiny_data_dir):
    exp = tiny_spec_file.parent / "runs" / "tiny"
    proc = _submit(tiny_spec_file, "sweep={train.lr: [1.0e-3, 1.0e-2]}", "resources.cpus_per_trial=0.5",
                   "train.log_every=3", f"data.test={tiny_data_dir}/eval.jsonl",
                   f"eval.control={tiny_data_dir}/train.jsonl", "eval.max_control_examples=4",
                   "results.max_control_increase=10.0", "--no-dashboard")
    assert proc.returncode == 0, _out(proc)
    board = json.loads((exp / "leaderboard.json").read_text())
    assert all(t["control_base_ppl"] > 0 and t["control_ppl"] > 0 for t in board["trials"])
    assert len({t["control_base_ppl"] for t in board["trials"]}) == 1  # the same base, the same tokens
    test = json.loads((exp / "test.json").read_text())
    assert test["trial_id"] == board["best"] == board["test"]["trial_id"]
    best = next(t for t in board["trials"] if t["trial_id"] == board["best"])
    # The test file is the eval file here: the same tokens give the same tuned figure.
    assert test["tuned_ppl"] == pytest.approx(best["eval_ppl"], rel=1e-4)
    assert f"test set: measuring the best trial {board['best']}" in proc.stdout
    md = (exp / "leaderboard.md").read_text()
    assert "## Test set" in md and "control change" in md and "Selection: lowest eval_ppl" in md
