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


def test_keep_best_keeps_the_lowest_periodic_eval_adapter(tmp_path, tiny_model_dir, tiny_data_dir):
    # A rate high enough that the eval perplexity does not fall at every step.
    spec = tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir,
                     ["eval.every_steps=1", "eval.keep=best", "train.max_steps=5", "train.lr=0.3",
                      "train.warmup_ratio=0", "train.checkpoint_every=100", "eval.prompts=null"])
    result, _ = run_fit(spec, tmp_path / "trial")
    rows = [json.loads(line) for line in (tmp_path / "trial" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_ppl"] for r in rows}
    best = min(evals, key=evals.get)
    assert result.best_step == best
    # The periodic evals use the whole eval set here, so the final figure, measured with the
    # kept adapter's weights, is the best step's figure again.
    assert math.isclose(result.eval_ppl, evals[best], rel_tol=1e-4)
    status = json.loads((tmp_path / "trial" / "result.json").read_text())["final"]
    assert status["best_step"] == best
