"""Periodic eval while training (``eval.every_steps``) on the tiny random Llama with real NF4 on
the CPU: the eval steps' rows carry ``eval_ppl``, the same figure reaches ``report``, and an eval
step also checkpoints."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_train import run_fit, tiny_spec  # noqa: E402


def test_periodic_eval_rows_reports_and_checkpoints(tmp_path, tiny_model_dir, tiny_data_dir):
    spec = tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir,
                     ["eval.every_steps=2", "eval.periodic_max_examples=2", "train.max_steps=5",
                      "train.checkpoint_every=100", "eval.prompts=null"])
    result, reports = run_fit(spec, tmp_path / "trial")
    rows = [json.loads(line) for line in (tmp_path / "trial" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_ppl"] for r in rows if r.get("eval_ppl") is not None}
    # Every 2 steps and at the last one.
    assert sorted(evals) == [2, 4, 5] and all(math.isfinite(v) and v > 1 for v in evals.values())
    assert {m["step"]: m["eval_ppl"] for m, _ in reports if m.get("eval_ppl") is not None} == evals
    # Eval steps checkpoint (the newest two are kept).
    assert sorted(p.name for p in (tmp_path / "trial" / "checkpoints").iterdir()) == ["step_4", "step_5"]
    assert [Path(c).name for m, c in reports if c] == ["step_2", "step_4", "step_5"]
    assert result.step == 5
