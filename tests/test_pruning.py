"""Sweeps that stop losing trials early, through a REAL local Ray (``ray``-marked; minutes here):
a 4-trial ASHA sweep where two learning rates are hopeless prunes those two at the first rung,
finishes the others, leaves no TorchTrainer controller or worker alive, and a re-submit trains
nothing. The Ray runs in this process so the test can ask Ray's state API about actors after
the sweep."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

GOOD, HOPELESS = ["tiny-lr0.02", "tiny-lr0.01"], ["tiny-lr1e-7", "tiny-lr1e-8"]


def _asha_spec(tiny_spec_file: Path, runner: str) -> Path:
    path = tiny_spec_file.parent / "asha.yaml"
    # One at a time, in this order, so the test is exact (ASHA itself is order-free): a trial
    # reaching a rung is stopped when worse than the median of those recorded there before it.
    # 2e-2 beats 1e-2 at steps 2 and 4 (and is kept); the hopeless rates meet both good ones at
    # the first rung (step 2).
    path.write_text(
        "base: tiny.yaml\nname: tiny\n"
        "train: {max_steps: 6, batch_size: 4, log_every: 2, checkpoint_every: 100, gradient_checkpointing: false}\n"
        "eval: {every_steps: 2, periodic_max_examples: 2, prompts: null, max_new_tokens: 4}\n"
        "search: {scheduler: asha, grace_period: 2, reduction_factor: 2}\n"
        "sweep: {train.lr: [1.0e-2, 2.0e-2, 1.0e-7, 1.0e-8]}\n"
        f"resources: {{gpus_per_trial: 0, cpus_per_trial: 0.5, max_concurrent_trials: 1, runner: {runner}}}\n",
        encoding="utf-8")
    return path


@pytest.mark.ray
def test_asha_prunes_hopeless_rates_and_a_resubmit_trains_nothing(tiny_spec_file):
    import ray
    from ray.util.state import list_actors
    from rich.console import Console

    from qlora_ray.runtime.submit import submit

    spec = _asha_spec(tiny_spec_file, "train")
    exp = tiny_spec_file.parent / "runs" / "tiny"
    out = io.StringIO()
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                   _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        outcome = submit(spec, [], Console(file=out, width=200))
        actors = list_actors(address=f"http://{ctx.dashboard_url}", limit=1000)
    finally:
        ray.shutdown()
    text = out.getvalue()
    board = {t["trial_id"]: t for t in json.loads((exp / "leaderboard.json").read_text())["trials"]}
    for tid in GOOD:
        assert board[tid]["status"] == "finished" and board[tid]["step"] == 6, text
    for tid in HOPELESS:
        row = board[tid]
        assert row["status"] == "pruned" and row["pruned_step"] == 2, text
        status = json.loads((exp / tid / "status.json").read_text())
        assert status["status"] == "pruned" and status["pruned_step"] == 2 and status["pruned_eval_ppl"] > 1
        # It keeps its last checkpoint and the adapter saved at its last eval (a tiny trial may
        # take a few more steps while Tune ends its process).
        assert any(p.name.startswith("step_") for p in (exp / tid / "checkpoints").iterdir())
        assert (exp / tid / "adapter" / "adapter_model.safetensors").is_file()
        assert row["eval_ppl"] > max(board[g]["eval_ppl"] for g in GOOD)
    md = (exp / "leaderboard.md").read_text()
    assert "pruned @ step 2" in md and "(2 finished, 2 pruned)" in md
    assert "[  pruned] tiny-lr1e-7" in text
    assert {r.trial_id for r in outcome.unfinished} == set()
    # The stopped trials' processes ended, and their TorchTrainer controller and worker with them.
    trial_actors = [a for a in actors if "Train" in a.class_name or a.class_name == "ImplicitFunc"]
    assert {a.class_name for a in trial_actors} >= {"TrainController", "RayTrainWorker", "ImplicitFunc"}
    leftovers = [(a.class_name, a.pid) for a in trial_actors if a.state != "DEAD"]
    assert leftovers == [], leftovers

    again = io.StringIO()
    submit(spec, [], Console(file=again, width=200))
    assert "all 4 trial(s) already finished; nothing to run" in again.getvalue()
    assert json.loads((exp / HOPELESS[0] / "status.json").read_text())["status"] == "pruned"
