"""Resources a stopped trial leaves behind, through a REAL local Ray (``ray``-marked).

A trial ASHA stops ends with its Tune process; its Ray Train controller dies with it and its
worker's placement group stays reserved (Ray frees a group an actor made only when the job
ends). Ray Train's own cleaner removes it only through the dashboard's state API, which it
cannot reach without a dashboard, nor when several Ray instances run on one machine. These tests
start their Ray without a dashboard, so that cleaner cannot help, as on a shared machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


# The sweep runs in a fresh process: run in the pytest process, it left test_pruning's later
# sweep in that process without the trial actors that test looks for (2 runs of 2).
SWEEP_IN_A_FRESH_PROCESS = """
import io, json, sys
from pathlib import Path
import ray
from rich.console import Console
from qlora_ray.runtime.submit import submit
ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
out = io.StringIO()
try:
    outcome = submit(Path(sys.argv[1]), [], Console(file=out, width=200))
finally:
    ray.shutdown()
print(out.getvalue())
print(json.dumps([row.trial_id for row in outcome.unfinished]))
"""


@pytest.mark.ray
@pytest.mark.slow  # three real TorchTrainer trials, ~15-20 s of worker start each: about 2 min on 2 cores
def test_the_trial_after_a_pruned_one_gets_every_cpu_of_the_cluster(tiny_spec_file):
    """Each trial takes all of the cluster's CPUs (a Ray of 2 CPUs, 2 per trial): the trial after
    the pruned one runs only if the pruned trial's worker resources come back."""
    spec = tiny_spec_file.parent / "asha.yaml"
    # 1e-7 meets 2e-2 at the first rung (step 2) and is pruned; 1.9e-2 learns as 2e-2 does, so it
    # clears that rung and must then get both CPUs to finish.
    spec.write_text(
        "base: tiny.yaml\nname: tiny\n"
        "train: {max_steps: 4, batch_size: 4, log_every: 2, checkpoint_every: 100, gradient_checkpointing: false}\n"
        "eval: {every_steps: 2, periodic_max_examples: 2, prompts: null, max_new_tokens: 4}\n"
        "search: {scheduler: asha, grace_period: 2, reduction_factor: 2}\n"
        "sweep: {train.lr: [2.0e-2, 1.0e-7, 1.9e-2]}\n"
        "resources: {gpus_per_trial: 0, cpus_per_trial: 2, max_concurrent_trials: 1}\n", encoding="utf-8")
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", SWEEP_IN_A_FRESH_PROCESS, str(spec)], capture_output=True,
                          text=True, timeout=900, env=env)
    text = f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, text
    exp = tiny_spec_file.parent / "runs" / "tiny"
    board = {t["trial_id"]: t for t in json.loads((exp / "leaderboard.json").read_text())["trials"]}
    assert board["tiny-lr1e-7"]["status"] == "pruned" and board["tiny-lr1e-7"]["pruned_step"] == 2, text
    for tid in ("tiny-lr0.02", "tiny-lr0.019"):
        assert board[tid]["status"] == "finished" and board[tid]["step"] == 4, (tid, board[tid].get("reason"), text)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], text


@pytest.mark.ray
def test_orphaned_groups_are_released_and_a_driver_task_waits_a_bounded_time():
    """A group whose creator died is freed for the next task; a task whose resources are held by a
    live owner ends after its wait with an error that names them, instead of waiting forever."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from qlora_ray.runtime.placement import ResourcesUnavailable, release_orphans, run_reserved
    from qlora_ray.spec import ResourcesSpec

    @ray.remote(num_cpus=0)
    class Holder:  # stands in for a Train controller: it reserves its worker's CPU, then dies
        def reserve(self) -> bool:
            return placement_group([{"CPU": 1}]).wait(30)

    def answer() -> int:
        return 42

    said = []
    one_cpu = ResourcesSpec(gpus_per_trial=0, cpus_per_trial=1)
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        holder = Holder.remote()
        assert ray.get(holder.reserve.remote())
        ray.kill(holder)
        # The dead holder's CPU is freed while the task waits for it.
        assert run_reserved(answer, (), one_cpu, "test set", said.append, wait_s=60) == 42

        held = placement_group([{"CPU": 1}])  # a live owner (this driver) keeps the CPU
        assert held.wait(30)
        assert release_orphans() == 0
        with pytest.raises(ResourcesUnavailable) as info:
            run_reserved(answer, (), one_cpu, "test set", said.append, wait_s=3)
        assert "test set: could not get its resources (1 CPU) in 3 s" in str(info.value)
        assert "0 of 1 CPU free" in str(info.value) and "resources.cpus_per_trial" in str(info.value)
        assert any(line.startswith("test set: waiting for its resources (1 CPU") for line in said)
        remove_placement_group(held)
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run_reserved(answer, (), one_cpu, "test set", said.append, wait_s=60) == 42
    finally:
        ray.shutdown()
