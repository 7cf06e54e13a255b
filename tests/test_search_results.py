"""The leaderboard of a searched sweep from synthetic trial records (no Ray, no torch): seeds
grouped into configurations with mean and spread, and a difference within the spread flagged;
a pruned trial as ``pruned @ step k`` with its last eval perplexity; the kept best step; the plot
with eval-perplexity curves."""

from __future__ import annotations

import json
from pathlib import Path

from qlora_ray import results


def _trial(exp: Path, tid: str, values: dict, status: str, ppl: float | None, evals=(), **extra) -> None:
    folder = exp / tid
    folder.mkdir(parents=True)
    rows = [{"step": s, "loss": 2.0, "total_steps": 8, **({"eval_ppl": e} if e else {})}
            for s, e in [(s, dict(evals).get(s)) for s in range(1, 9 if status == "finished" else 5)]]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "status.json").write_text(json.dumps({"trial_id": tid, "values": values, "status": status, **extra}))
    if status == "finished":
        final = {"step": 8, "total_steps": 8, "eval_ppl": ppl, "base_ppl": 50.0, **extra.get("final", {})}
        (folder / "result.json").write_text(json.dumps({"schema": 1, "final": final}))


def test_seeds_mean_spread_and_flags(tmp_path):
    exp = tmp_path / "seeds"
    ppls = {8: [30.0, 31.0, 32.0], 16: [30.5, 31.5, 29.5], 32: [40.0, 40.5, 41.0]}
    plan = []
    for r, values in ppls.items():
        for k, ppl in enumerate(values):
            tid = f"seeds-r{r}_seed{42 + k}"
            plan.append({"id": tid, "values": {"lora.r": r, "train.seed": 42 + k}})
            _trial(exp, tid, plan[-1]["values"], "finished", ppl)
    (exp / "experiment.json").write_text(json.dumps({"name": "seeds", "sweep_keys": ["lora.r", "train.seed"],
                                                     "trials": plan}))
    board = results.write_leaderboard(exp, with_plot=False)
    groups = json.loads((exp / "leaderboard.json").read_text())["configurations"]
    assert [g["values"] for g in groups] == [{"lora.r": 16}, {"lora.r": 8}, {"lora.r": 32}]
    best, second, third = groups
    assert best["n"] == 3 and abs(best["mean_eval_ppl"] - 30.5) < 1e-9 and abs(best["spread"] - 1.0) < 1e-9
    # r8's mean is 0.5 above r16's with spreads of 1: within the spread; r32 is clearly worse.
    assert second["within_spread_of_best"] and not third["within_spread_of_best"]
    md = (exp / "leaderboard.md").read_text()
    assert "## Configurations over seeds" in md
    assert "| r=16 | 3/3 | 30.50 | 1.00 | 29.50 | 31.50 | best |" in md
    assert "| r=8 | 3/3 | 31.00 | 1.00 | 30.00 | 32.00 | within spread |" in md
    assert "| r=32 | 3/3 | 40.50 | 0.50 | 40.00 | 41.00 |  |" in md
    assert board.best.trial_id == "seeds-r16_seed44"


def test_pruned_and_best_step_rows_and_the_curves_plot(tmp_path):
    exp = tmp_path / "asha"
    _trial(exp, "asha-lr1e-3", {"train.lr": 1e-3}, "finished", 20.0, evals=[(2, 30.0), (4, 22.0), (6, 19.5), (8, 21.0)],
           final={"best_step": 6})
    _trial(exp, "asha-lr1e-7", {"train.lr": 1e-7}, "pruned", None, evals=[(2, 49.0), (4, 48.9)],
           pruned_step=2, pruned_eval_ppl=49.0, reason="stopped by asha at step 2")
    (exp / "experiment.json").write_text(json.dumps({"name": "asha", "sweep_keys": ["train.lr"], "trials": [
        {"id": "asha-lr1e-3", "values": {"train.lr": 1e-3}}, {"id": "asha-lr1e-7", "values": {"train.lr": 1e-7}}]}))
    board = results.write_leaderboard(exp)
    finished, pruned = board.rows
    assert pruned.status == "pruned" and pruned.step == 2 and pruned.eval_ppl == 49.0
    assert pruned.evals == [(2, 49.0), (4, 48.9)] and finished.evals[-1] == (8, 21.0)
    md = (exp / "leaderboard.md").read_text()
    assert "| pruned @ step 2 | 2/8 |" in md and "| finished, best @ step 6 | 8/8 |" in md
    assert "(1 finished, 1 pruned)" in md and "49.00" in md
    record = json.loads((exp / "leaderboard.json").read_text())["trials"]
    assert [r["pruned_step"] for r in record] == [None, 2] and record[0]["best_step"] == 6
    assert (exp / "leaderboard.png").stat().st_size > 0 and board.best.trial_id == "asha-lr1e-3"
    # The plot's eval-perplexity curves: one line per trial with periodic evals.
    fig = results.figure(board)
    curves = [ax for ax in fig.axes if ax.get_title() == "eval perplexity while training"]
    assert len(curves) == 1
    lines = [line.get_label() for line in curves[0].get_lines() if not line.get_label().startswith("_")]
    assert lines == ["lr=0.001", "lr=1e-07 (pruned)"]
