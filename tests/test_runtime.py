"""The runtime through a REAL local Ray (nothing mocked): ``qlora-ray submit`` of the tiny spec as a
2x2 grid end to end on the CPU, a re-submit that skips finished trials, a worker SIGKILLed mid-run
that resumes from its checkpoint, and a fail-fast on GPUs the machine lacks.

Each Ray trial costs ~15-30 s of orchestration on 2 cores (actor start-up, process group), so the
Ray tests are few and marked ``ray`` (in the default tier; ``-m 'not ray'`` skips them for a quick
run); the storage, exit-status and spec-change checks around them need no Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qlora_ray.errors import UserError
from qlora_ray.runtime import LOCAL_RAY_ENV, Cluster, check_resources, concurrency, slots, spec_changes
from qlora_ray.spec import load_spec
from qlora_ray.storage import Storage

sys.path.insert(0, str(Path(__file__).parent))
from multinode import T4_WORKER, LoopbackCluster  # noqa: E402

SWEEP = "sweep={lora.r: [2, 4], train.lr: [5.0e-3, 1.0e-2]}"
FAST = ["resources.cpus_per_trial=0.5", "train.log_every=3"]
IDS = ["tiny-r2_lr0.01", "tiny-r2_lr5e-3", "tiny-r4_lr0.01", "tiny-r4_lr5e-3"]
FAULTY_SUBMIT = Path(__file__).parent / "faulty_submit.py"


def _submit(spec: Path, *args: str, env: dict | None = None, timeout: int = 420,
            faults: dict | None = None) -> subprocess.CompletedProcess:
    """``qlora-ray submit`` in a fresh process (its own embedded Ray), as a user runs it; with
    ``faults``, through ``faulty_submit.py``, which installs that test-only fault plan first."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                           full_env.get("PYTHONPATH")]))
    entry = ["-m", "qlora_ray", "submit"] if faults is None else [str(FAULTY_SUBMIT), json.dumps(faults)]
    return subprocess.run([sys.executable, *entry, str(spec), *args],
                          capture_output=True, text=True, timeout=timeout, env=full_env, cwd=spec.parent)


def _out(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-6000:]}"


def _rows(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.ray
def test_grid_end_to_end_then_resubmit_skips_finished(tiny_spec_file):
    exp = tiny_spec_file.parent / "runs" / "tiny"
    # 0.4 CPU per trial: all four run at once on 2 cores (one wave of Ray start-up, not two) and a
    # fifth slot is left for measuring the base model beside them; a report every 3 steps: Ray
    # Train hands one report at a time to its controller.
    proc = _submit(tiny_spec_file, SWEEP, *FAST, "resources.cpus_per_trial=0.4")
    assert proc.returncode == 0, _out(proc)
    out = proc.stdout
    # What the terminal shows: where Ray is, one line per trial state change, the leaderboard.
    assert "Ray dashboard: http://127.0.0.1:" in out and "Ray logs: " in out
    assert "running 4 trial(s), 4 at a time" in out
    assert "measuring the base model once (perplexity, sample replies), alongside the trials" in out
    assert f"baseline: saved {exp / 'baseline.json'}" in out
    for tid in IDS:
        assert f"[finished] {tid}  step 6/6" in out
    assert "# tiny: 4 trials (4 finished)" in out
    # ... and not Ray's own stream (worker prints, Tune status tables).
    assert "(RayTrainWorker" not in out and "Trial status" not in out and "(pid=" not in out

    board = json.loads((exp / "leaderboard.json").read_text())
    assert [t["status"] for t in board["trials"]] == ["finished"] * 4
    assert sorted(t["trial_id"] for t in board["trials"]) == IDS
    ppls = [t["eval_ppl"] for t in board["trials"]]
    assert ppls == sorted(ppls) and all(p > 1 for p in ppls)
    base = json.loads((exp / "baseline.json").read_text())["perplexity"]
    assert {t["base_ppl"] for t in board["trials"]} == {base} == {board["base_ppl"]}
    assert {(t["lora.r"], t["train.lr"]) for t in board["trials"]} == {(2, 5e-3), (2, 1e-2), (4, 5e-3), (4, 1e-2)}
    for t in board["trials"]:
        assert t["step"] == 6 and t["tokens_per_s"] > 0 and t["trial_wall_s"] >= t["train_wall_s"] > 0
    assert (exp / "leaderboard.png").stat().st_size > 10_000
    assert (exp / "leaderboard.md").read_text().count("| finished |") == 4
    best = exp / "best"
    assert best.is_symlink() and best.resolve().name == board["best"] == board["trials"][0]["trial_id"]
    assert (best / "adapter" / "adapter_config.json").is_file()
    for tid in IDS:
        trial = exp / tid
        # The base model was measured once for the experiment, not by each trial: its task
        # finished while the trials trained, and each took its figures from it at the end.
        assert not (trial / "baseline.json").exists()
        status = json.loads((trial / "status.json").read_text())
        assert status["status"] == "finished" and status["schema"] == 1 and "result" not in status
        # The final figures are stored once, in result.json; metrics.jsonl holds step rows only.
        result = json.loads((trial / "result.json").read_text())
        assert result["final"]["step"] == 6 and result["error"] is None and result["timing"]
        assert [r["step"] for r in _rows(trial / "metrics.jsonl")] == [3, 6]
        assert yaml.safe_load((trial / "resolved_spec.yaml").read_text())["sweep"] == {}
    assert (exp / "_ray" / "train" / IDS[0]).is_dir()  # Train's checkpoints live with the experiment

    # Re-submitting the same spec runs nothing: no Ray, no training, same leaderboard.
    before = {tid: (exp / tid / "metrics.jsonl").read_text() for tid in IDS}
    again = _submit(tiny_spec_file, SWEEP, *FAST, "--no-dashboard")
    assert again.returncode == 0, _out(again)
    assert "all 4 trial(s) already finished; nothing to run" in again.stdout
    assert "Ray logs:" not in again.stdout and "[finished]" not in again.stdout
    assert {tid: (exp / tid / "metrics.jsonl").read_text() for tid in IDS} == before

    # A changed spec is refused (exit 2) instead of silently mixing two experiments.
    changed = _submit(tiny_spec_file, SWEEP, *FAST, "train.max_steps=8", timeout=60)
    assert changed.returncode == 2, _out(changed)
    assert "train.max_steps: 6 -> 8" in changed.stderr and "--fresh" in changed.stderr


@pytest.mark.ray
def test_killed_worker_on_a_t4_node_resumes_from_its_checkpoint(tiny_spec_file, tmp_path):
    """``--address`` of a real two-node cluster whose worker has one logical GPU labelled T4.

    The trial asks for that GPU and accelerator type, so Ray places its Train worker there
    (CUDA_VISIBLE_DEVICES set, no CUDA: it trains on the CPU). The worker SIGKILLs itself at step 5
    on its first attempt; Ray Train restarts it, the loop gets the step-3 checkpoint from
    ``ray.train.get_checkpoint()`` and the trial finishes at step 6. Then a spec asking for what
    the cluster lacks fails at once, naming the keys.
    """
    exp = tiny_spec_file.parent / "runs" / "tiny"
    gpu = ["resources.gpus_per_trial=1", "resources.accelerator_type=T4"]
    with LoopbackCluster(head={"num_cpus": 1, "num_gpus": 0}, workers=[T4_WORKER],
                         log_path=tmp_path / "cluster.log") as cluster:
        proc = _submit(tiny_spec_file, *gpu, "--address", cluster.address, env=cluster.env(),
                       faults={"kill_at_step": 5})
        assert proc.returncode == 0, _out(proc)
        t4_node = cluster.nodes[1]

        lacking = _submit(tiny_spec_file, "name=lacking", "resources.gpus_per_trial=2",
                          "resources.accelerator_type=A100", "--address", cluster.address, env=cluster.env(),
                          timeout=120)

    trial = exp / "tiny"
    assert (trial / ".test-killed").exists()  # the fault did fire
    starts = _rows(trial / "events.jsonl")
    assert len(starts) == 2 and starts[0]["resume_from"] is None
    assert "/_ray/train/tiny/checkpoint_" in starts[1]["resume_from"]
    assert starts[0]["pid"] != starts[1]["pid"]
    assert {s["node_id"] for s in starts} == {t4_node}
    assert {s["cuda_visible_devices"] for s in starts} == {"0"}  # a logical GPU: a label, trained on the CPU
    rows = _rows(trial / "metrics.jsonl")
    # One history: rows 1-3 from the first attempt, 4-6 from the resumed one.
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    status = json.loads((trial / "status.json").read_text())
    assert status["status"] == "finished" and status["attempts"] == 2
    final = json.loads((trial / "result.json").read_text())["final"]
    assert final["step"] == 6 and final["total_steps"] == 6 and final["eval_ppl"] > 1
    assert "[finished] tiny  step 6/6" in proc.stdout

    assert lacking.returncode == 2, _out(lacking)
    assert "resources.gpus_per_trial: 2 GPU(s) per trial, but the cluster at" in lacking.stderr
    assert "resources.accelerator_type: no node of the cluster at" in lacking.stderr
    assert "offers 'A100' (it has: T4)" in lacking.stderr
    assert not (exp.parent / "lacking").exists()  # refused before anything was written


@pytest.mark.ray
def test_tune_runner_trains_in_the_trial_and_resumes_after_a_kill(tiny_spec_file):
    """``resources.runner: tune``: each trial trains in its own Tune process (no TorchTrainer, no
    Train worker). Both trials SIGKILL themselves at step 5 on their first attempt; Tune restarts
    each from its step-3 checkpoint (``tune.get_checkpoint()``) and both finish at step 6."""
    exp = tiny_spec_file.parent / "runs" / "tiny"
    proc = _submit(tiny_spec_file, "sweep={lora.r: [2, 4]}", "resources.runner=tune", "--no-dashboard",
                   faults={"kill_at_step": 5})
    assert proc.returncode == 0, _out(proc)
    assert not (exp / "_ray" / "train").exists()  # no Ray Train run was started
    board = json.loads((exp / "leaderboard.json").read_text())
    assert [t["status"] for t in board["trials"]] == ["finished", "finished"]
    for tid in ("tiny-r2", "tiny-r4"):
        trial = exp / tid
        assert (trial / ".test-killed").exists()  # the fault did fire
        starts = _rows(trial / "events.jsonl")
        assert len(starts) == 2 and starts[0]["resume_from"] is None
        assert f"/_ray/tiny/{tid}/checkpoint_" in starts[1]["resume_from"]
        assert starts[0]["pid"] != starts[1]["pid"]
        rows = _rows(trial / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
        status = json.loads((trial / "status.json").read_text())
        assert status["status"] == "finished" and status["attempts"] == 2, status
        assert set(status["overhead"]) == {"worker_start_s", "worker_setup_s", "teardown_s"}, status




@pytest.mark.ray
def test_trials_that_cannot_finish_fail_at_once_and_submit_exits_1(tiny_spec_file):
    """Two trials through a real local Ray, neither able to finish. One's training loss is inf at
    its first reported step (an injected test-only fault raised where the loss check raises; test_train covers the
    check itself): deterministic, so Ray Train must not restart it although resources.max_failures is 2.
    The other's Tune trial function crashes (an injected test-only fault), which Tune marks ERROR:
    the driver stamps its status.json failed with the reason. Both are failed with their reasons in
    status.json and the leaderboard, and submit exits 1 with one line naming both."""
    exp = tiny_spec_file.parent / "runs" / "tiny"
    nan_id, crash_id = "tiny-alpha16", "tiny-alpha8"
    proc = _submit(tiny_spec_file, "sweep={lora.alpha: [8, 16]}", *FAST, "--no-dashboard",
                   faults={"crash_trial": crash_id, "inf_loss_trial": nan_id})
    assert proc.returncode == 1, _out(proc)

    nan = json.loads((exp / nan_id / "status.json").read_text())
    assert nan["status"] == "failed", nan
    assert nan["reason"].startswith("NonFiniteLossError: step 3: training loss is inf"), nan
    assert nan["attempts"] == 1  # one worker start: no retry
    assert len(_rows(exp / nan_id / "events.jsonl")) == 1
    crash = json.loads((exp / crash_id / "status.json").read_text())
    assert crash["status"] == "failed", crash
    assert crash["reason"] == (f"trial driver crashed: RuntimeError: injected fault: the trial driver of "
                               f"{crash_id} crashed on purpose"), crash
    assert crash["ended_at"] and not (exp / crash_id / "events.jsonl").exists()  # no Train worker started

    board = json.loads((exp / "leaderboard.json").read_text())
    assert {t["trial_id"]: (t["status"], t["reason"]) for t in board["trials"]} == {
        nan_id: ("failed", nan["reason"]), crash_id: ("failed", crash["reason"])}
    assert f"[  failed] {crash_id}  trial driver crashed: RuntimeError" in proc.stdout
    exit_line = next(line for line in proc.stderr.splitlines() if "did not finish" in line)
    assert exit_line.startswith("2 of 2 trial(s) did not finish: ")
    assert f"{nan_id} failed: NonFiniteLossError: step 3" in exit_line
    assert f"{crash_id} failed: trial driver crashed: RuntimeError" in exit_line


@pytest.mark.ray
def test_local_ray_registers_and_listens_on_loopback_only():
    """The embedded Ray's node address is 127.0.0.1 (Ray would take this machine's network IP
    even for _node_ip_address="127.0.0.1"), its dashboard too, and its processes listen on no
    other address."""
    code = """
import json, os, subprocess, ray
from qlora_ray import runtime
with runtime.connect() as cluster:
    pids = {str(p) for p in [os.getpid()]}
    for _ in range(3):  # the driver's Ray processes and theirs
        pids |= {c for p in list(pids) for c in subprocess.run(["pgrep", "-P", p], capture_output=True,
                                                               text=True).stdout.split()}
    ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
    listening = sorted({l.split()[3] for l in ss if any(f"pid={p}," in l for p in pids)})
    print(json.dumps({"nodes": [n["NodeManagerAddress"] for n in ray.nodes()], "dashboard": cluster.dashboard_url,
                      "task": ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote()),
                      "ray_env": ray.get(ray.remote(
                          lambda: {k: os.environ.get(k) for k in runtime.LOCAL_RAY_ENV}).remote()),
                      "driver_env": {k: os.environ.get(k) for k in runtime.LOCAL_RAY_ENV},
                      "listening": listening}))
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k not in LOCAL_RAY_ENV}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, _out(proc)
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["nodes"] == ["127.0.0.1"] and seen["task"] == "127.0.0.1", seen
    assert seen["dashboard"].startswith("http://127.0.0.1:"), seen
    # Ray's processes run with the local settings (faster Train health check, no preemption
    # watcher); this process's environment is as it was.
    assert seen["ray_env"] == LOCAL_RAY_ENV, seen
    assert seen["driver_env"] == {k: None for k in LOCAL_RAY_ENV}, seen
    hosts = {addr.rsplit(":", 1)[0] for addr in seen["listening"]}
    assert hosts and hosts <= {"127.0.0.1", "[::ffff:127.0.0.1]"}, seen["listening"]


@pytest.mark.ray
def test_base_model_task_beside_the_trials_is_saved_or_left_to_them(tmp_path):
    """A trial takes the base-model task's figures only once it has finished (never waits);
    after the grid a finished task's figures become ``baseline.json``, while a failed one or
    one still running (then cancelled) is reported and leaves each trial's own figures."""
    code = f"""
import json, time, ray
from qlora_ray import runtime
from qlora_ray.records import Baseline
from qlora_ray.runtime.baseline import base_figures, finish_baseline
from qlora_ray.storage import Storage
said = []
with runtime.connect(runtime.ConnectOptions(dashboard=False)):
    storage = Storage({str(tmp_path / "exp")!r})
    done = ray.remote(lambda: Baseline(perplexity=12.5, target_tokens=3).to_json()).remote()
    failed = ray.remote(lambda: 1 / 0).options(max_retries=0).remote()
    slow = ray.remote(lambda: time.sleep(120)).remote()
    ray.wait([done, failed], num_returns=2)
    figures = {{name: base_figures(ref)() for name, ref in
               (("done", done), ("failed", failed), ("slow", slow))}}
    for ref in (slow, failed):
        finish_baseline(ref, storage, said.append)
        assert not storage.exists("baseline.json")
    finish_baseline(done, storage, said.append)
    print(json.dumps({{"figures": {{k: v and v.perplexity for k, v in figures.items()}}, "said": said,
                      "saved": json.loads(storage.read_text("baseline.json"))["perplexity"]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, _out(proc)
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["figures"] == {"done": 12.5, "failed": None, "slow": None}
    assert seen["saved"] == 12.5
    not_done, failed, saved = seen["said"]
    assert not_done.startswith("baseline: not done when the trials ended")
    assert failed == ("baseline: measuring the base model failed (ZeroDivisionError: division by zero); "
                      "each trial measured it itself")
    assert saved == f"baseline: saved {tmp_path / 'exp' / 'baseline.json'}"


# ---------------------------------------------------------------- no Ray needed

def test_submit_exit_status_names_the_trials_that_did_not_finish(tiny_spec_file, monkeypatch):
    """`qlora-ray submit` exits 0 only when every trial of the spec finished; else 1, with one
    line naming each trial that did not and why (rows an earlier, wider sweep left do not count)."""
    from typer.testing import CliRunner

    from qlora_ray import results, runtime
    from qlora_ray.cli import app

    def row(tid, status, reason=None):
        return results.TrialRow(trial_id=tid, values={"lora.r": int(tid.rsplit("r", 1)[1])}, status=status,
                                reason=reason, eval_ppl=3.0 if status == "finished" else None)

    board = results.Leaderboard(name="tiny", sweep_keys=["lora.r"], rows=[
        row("tiny-r2", "finished"), row("tiny-r4", "failed", "NonFiniteLossError: step 1: training loss is nan"),
        row("tiny-r8", "stopped", "interrupted"), row("tiny-r16", "failed", "from an earlier sweep")])
    planned = ["tiny-r2", "tiny-r4", "tiny-r8"]  # what runtime.submit says this spec planned
    monkeypatch.setattr(runtime, "submit", lambda *args, **kwargs: runtime.SubmitOutcome(
        board=board, exp=str(tiny_spec_file.parent / "runs/tiny"), planned=planned))
    runner = CliRunner()
    sweep = "sweep={lora.r: [2, 4, 8]}"
    result = runner.invoke(app, ["submit", str(tiny_spec_file), sweep])
    assert result.exit_code == 1, result.output
    assert ("2 of 3 trial(s) did not finish: tiny-r4 failed: NonFiniteLossError: step 1: training loss is nan; "
            "tiny-r8 stopped: interrupted") in result.stderr
    assert "tiny-r16" not in result.stderr

    board.rows = [row("tiny-r2", "finished"), row("tiny-r4", "finished"), row("tiny-r8", "finished"),
                  row("tiny-r16", "failed", "from an earlier sweep")]
    result = runner.invoke(app, ["submit", str(tiny_spec_file), sweep])
    assert result.exit_code == 0, result.output
    assert "did not finish" not in result.output


def test_storage_on_a_uri_and_moving_aside(tmp_path):
    """The same Storage code serves s3:// and gs://; file:// exercises it without a network."""
    from qlora_ray.records import TrialState, TrialStatus

    storage = Storage(f"file://{tmp_path}/runs/exp")
    assert not storage.is_local_path and storage.local == tmp_path / "runs" / "exp"
    storage.write_record("t1/status.json", TrialStatus(trial_id="t1", status=TrialState.RUNNING))
    assert storage.read_record(TrialStatus, "t1/status.json").status == TrialState.RUNNING
    src = tmp_path / "staging"
    (src / "adapter").mkdir(parents=True)
    (src / "adapter" / "w.bin").write_bytes(b"x" * 10)
    (src / "checkpoints" / "step_3").mkdir(parents=True)
    (src / "checkpoints" / "step_3" / "optimizer.pt").write_bytes(b"o")
    storage.upload(src, "t1")
    assert (tmp_path / "runs/exp/t1/adapter/w.bin").read_bytes() == b"x" * 10
    assert not (tmp_path / "runs/exp/t1/checkpoints").exists()  # Ray Train keeps its own copies
    staged = storage.download(tmp_path / "restaged", rel="t1")
    assert (staged / "status.json").exists() and not (staged / "adapter").exists()
    mirror = storage.download(tmp_path / "mirror")
    assert (mirror / "t1" / "status.json").exists()
    moved = storage.move_aside()
    assert moved.startswith(f"file://{tmp_path}/runs/exp.old-") and not storage.exists()
    assert (Path(moved[len("file://"):]) / "t1" / "adapter" / "w.bin").exists()  # kept, not deleted


def test_spec_changes_ignore_sweep_resources_and_output(tiny_spec_file):
    from qlora_ray.spec import to_yaml

    spec = load_spec(tiny_spec_file)
    saved = to_yaml(spec)
    same = load_spec(tiny_spec_file, [SWEEP, "resources.max_concurrent_trials=1", "output.dir=/elsewhere"])
    assert spec_changes(saved, same) == []
    other = load_spec(tiny_spec_file, ["train.lr=0.02", "lora.alpha=16"])
    assert spec_changes(saved, other) == ["lora.alpha: 8 -> 16", "train.lr: 0.005 -> 0.02"]


def test_resource_checks_and_concurrency(tiny_spec_file):
    head = {"CPU": 2.0, "node:__internal_head__": 1.0}
    t4 = {"CPU": 4.0, "GPU": 1.0, "accelerator_type:T4": 1.0}
    a100 = {"CPU": 16.0, "GPU": 8.0, "accelerator_type:A100": 1.0}
    pool = Cluster(address="10.0.0.1:6379", embedded=False, dashboard_url=None, log_dir=None,
                   nodes=[head, t4, t4, a100])
    cpu_spec = load_spec(tiny_spec_file)
    t4_spec = load_spec(tiny_spec_file, ["resources.gpus_per_trial=1", "resources.accelerator_type=T4"])
    check_resources(t4_spec, pool)
    assert concurrency(t4_spec, pool, n_trials=12) == 2            # one per T4 node (the A100s are not T4)
    any_gpu = load_spec(tiny_spec_file, ["resources.gpus_per_trial=1"])
    assert concurrency(any_gpu, pool, n_trials=12) == 10           # 1 + 1 + 8 GPUs
    assert concurrency(any_gpu, pool, n_trials=3) == 3              # never more than the trials
    assert concurrency(cpu_spec, pool, n_trials=40) == 2 + 4 + 4 + 16  # CPU trials: by CPUs
    capped = load_spec(tiny_spec_file, ["resources.max_concurrent_trials=3"])
    assert concurrency(capped, pool, n_trials=40) == 3
    # Room for the base-model task beside the trials (one more slot than run at once)?
    assert slots(t4_spec, pool, 3) == 2                             # 2 T4 trials at once: no room
    assert slots(capped, pool, 4) == 4                              # 3 CPU trials at once: room
    sharing = load_spec(tiny_spec_file, ["resources.gpus_per_trial=0.08", "resources.cpus_per_trial=1"])
    one_gpu = Cluster(address="local", embedded=True, dashboard_url=None, log_dir=None,
                      nodes=[{"CPU": 16.0, "GPU": 1.0}])
    assert concurrency(sharing, one_gpu, 12) == 12 and slots(sharing, one_gpu, 13) == 12  # 13 x 0.08 > 1

    laptop = Cluster(address="local", embedded=True, dashboard_url=None, log_dir=None, nodes=[head])
    with pytest.raises(UserError) as e:
        check_resources(t4_spec, laptop)
    assert str(e.value).splitlines() == [
        "resources.gpus_per_trial: 1 GPU(s) per trial, but the local Ray (this machine) has 0 GPU(s); "
        "set resources.gpus_per_trial=0 to train on the CPU, or pass --address of a GPU cluster",
        "resources.accelerator_type: no node of the local Ray (this machine) offers 'T4' (it has: no typed "
        "GPUs); drop accelerator_type or use one of those"]
    big = load_spec(tiny_spec_file, ["resources.cpus_per_trial=8"])
    with pytest.raises(UserError, match=r"resources.cpus_per_trial: 8 CPUs per trial, but the largest node"):
        check_resources(big, laptop)
    # Each part fits somewhere, but no single node has all of them.
    split = Cluster(address="x", embedded=False, dashboard_url=None, log_dir=None,
                    nodes=[{"CPU": 1.0, "GPU": 1.0, "accelerator_type:T4": 1.0}, {"CPU": 8.0}])
    with pytest.raises(UserError, match="no single node has the GPUs, CPUs and accelerator type"):
        check_resources(load_spec(tiny_spec_file, ["resources.gpus_per_trial=1", "resources.cpus_per_trial=4"]),
                        split)


# ---------------------------------------------------------------- slow: the shipped smoke job

SMOKE_OVERRIDES = ["sweep={lora.r: [8, 16]}", "eval.max_prompts=2", "eval.max_new_tokens=24"]


@pytest.mark.slow
def test_smoke_job_sweep_through_local_ray(smollm2_gguf, tmp_path):
    """``qlora-ray submit jobs/hinglish_smoke.yaml`` (offline SmolLM2, NF4 on the CPU), two ranks,
    fewer sample replies; prints wall time, the leaderboard and Ray's overhead per trial."""
    root = Path(__file__).resolve().parents[1]
    # The shipped job, writing into tmp_path. (A wrapper spec, because the spec loader refuses an absolute
    # output.dir override outside the project when the file declares a relative one.)
    spec = tmp_path / "smoke.yaml"
    spec.write_text(f"base: {root / 'jobs' / 'hinglish_smoke.yaml'}\noutput: {{dir: {tmp_path}/runs}}\n")
    start = time.time()
    proc = _submit(spec, *SMOKE_OVERRIDES, timeout=3600)
    wall = time.time() - start
    assert proc.returncode == 0, _out(proc)
    board = json.loads((tmp_path / "runs" / "hinglish_smoke" / "leaderboard.json").read_text())
    assert [t["status"] for t in board["trials"]] == ["finished", "finished"]
    assert all(t["eval_ppl"] < t["base_ppl"] for t in board["trials"]), "QLoRA did not lower perplexity"
    # The base model is measured once (baseline.json) and every trial is compared with it.
    assert len({t["base_ppl"] for t in board["trials"]}) == 1 and board["base_ppl"] == board["trials"][0]["base_ppl"]
    # Ray's share of each trial: its wall time as the runtime saw it minus fit()'s own wall time.
    for t in board["trials"]:
        assert t["overhead_s"] is not None and t["overhead_s"] >= 0, t
        assert t["overhead_s"] == pytest.approx(t["trial_wall_s"] - t["train_wall_s"])
    print(f"\n$ qlora-ray submit jobs/hinglish_smoke.yaml {' '.join(SMOKE_OVERRIDES)} output.dir=...")
    print(f"wall time: {wall:.0f}s")
    print(proc.stdout[proc.stdout.index("# hinglish_smoke"):])
    for t in board["trials"]:
        print(f"{t['trial_id']}: trial wall {t['trial_wall_s']:.0f}s, fit wall_s {t['train_wall_s']:.0f}s, "
              f"Ray overhead {t['overhead_s']:.0f}s")
