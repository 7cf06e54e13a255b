"""Experiment tracking: the ``tracking:`` spec section, the tracker sink, and a real sweep logged
to a real local MLflow file store and TensorBoard event files. Tests needing an optional
tracker package skip when it is absent (``pip install 'qlora-ray[mlflow]'`` and so on)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from qlora_ray import layout, results
from qlora_ray.records import FinalMetrics, TrackingNote, TrialState, TrialStatus
from qlora_ray.spec import SpecError, load_spec
from qlora_ray.tracking import Tracker

from test_runtime import _out, _submit

needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                  reason="mlflow not installed (pip install 'qlora-ray[mlflow]')")
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="wandb not installed (pip install 'qlora-ray[wandb]')")


def _runs(store: Path, experiment: str):
    import os

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this

    client = MlflowClient(tracking_uri=f"file:{store}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def test_a_missing_tracker_package_is_a_spec_error_naming_the_extra(tiny_spec_file, monkeypatch):
    # Whether a package is installed is simulated here (find_spec answers None for the trackers),
    # so the test means the same on a machine that has them.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("mlflow", "wandb", "tensorboardX") else real(name, *a))
    with pytest.raises(SpecError) as info:
        load_spec(tiny_spec_file, ["tracking.tensorboard=true", "tracking.mlflow.tracking_uri=file:./mlruns",
                                   "tracking.wandb.project=p", "tracking.wandb.mode=onlin"])
    text = str(info.value)
    assert "tracking.mlflow: the mlflow package is not installed; pip install 'qlora-ray[mlflow]'" in text
    assert "tracking.wandb: the wandb package is not installed; pip install 'qlora-ray[wandb]'" in text
    assert "pip install 'qlora-ray[tensorboard]'" in text
    assert "tracking.wandb.mode: 'onlin' is not one of offline, online" in text
    with pytest.raises(SpecError, match=r"tracking\.mlflow\.experimnt: unknown key \(did you mean"):
        load_spec(tiny_spec_file, ["tracking.mlflow.experimnt=x"])


@needs_mlflow
def test_a_tracker_that_cannot_be_reached_is_noted_not_raised(tiny_spec_file, tmp_path):
    # Port 9 (discard) on the loopback: nothing listens, the connection is refused at once.
    spec = load_spec(tiny_spec_file, ["tracking.mlflow.tracking_uri=http://127.0.0.1:9", "tracking.tensorboard=true"])
    tracker = Tracker(spec, tmp_path)
    tracker.start("t1", spec)
    tracker.log_step("t1", {"step": 1, "loss": 2.0, "lr": 1e-3})
    tracker.log_final("t1", FinalMetrics(step=1, eval_ppl=3.0, base_ppl=4.0))
    tracker.end("t1", "finished")
    assert [e.split(":")[0] for e in tracker.errors["t1"]] == ["mlflow"]
    assert len(list((tmp_path / layout.TENSORBOARD_DIR / "t1").glob("events.out.tfevents.*"))) == 1  # TB went on

    # What the runtime writes for such a trial shows in its leaderboard row; the status stays.
    trial = tmp_path / "exp" / "t1"
    trial.mkdir(parents=True)
    (trial / layout.STATUS_FILE).write_text(TrialStatus(trial_id="t1", status=TrialState.FINISHED).to_json())
    (trial / layout.TRACKING_FILE).write_text(TrackingNote(errors=tracker.errors["t1"]).to_json())
    row = results.read_trial(trial)
    assert row.status == "finished" and row.reason.startswith("tracking failed: mlflow: ")


@needs_wandb
def test_wandb_offline_run(tiny_spec_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = load_spec(tiny_spec_file, ["tracking.wandb.project=qlora-ray-test", "tracking.wandb.mode=offline"])
    tracker = Tracker(spec, tmp_path)
    tracker.start("t1", spec)
    tracker.log_step("t1", {"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 10.0})
    samples = tmp_path / "samples.md"
    samples.write_text("# samples\n")
    tracker.log_final("t1", FinalMetrics(step=1, eval_ppl=3.0, base_ppl=4.0), samples)
    tracker.end("t1", "finished")
    assert tracker.errors == {}
    (run_dir,) = (tmp_path / layout.WANDB_DIR / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb")) and (run_dir / "files" / "samples.md").exists()


@needs_mlflow
@pytest.mark.ray
def test_a_sweep_logs_one_run_per_trial_to_mlflow_and_tensorboard(tiny_spec_file):
    exp = tiny_spec_file.parent / "runs" / "tiny"
    store = tiny_spec_file.parent / "mlruns"
    proc = _submit(tiny_spec_file, "sweep={lora.r: [2, 4]}", "train.log_every=3", "--no-dashboard",
                   f"tracking.mlflow.tracking_uri=file:{store}", "tracking.tensorboard=true")
    assert proc.returncode == 0, _out(proc)
    board = {t["trial_id"]: t for t in json.loads((exp / "leaderboard.json").read_text())["trials"]}
    assert set(board) == {"tiny-r2", "tiny-r4"} and all(t["status"] == "finished" for t in board.values())

    client, runs = _runs(store, "tiny")
    assert sorted(r.info.run_name for r in runs) == ["tiny-r2", "tiny-r4"]
    for run in runs:
        row = board[run.info.run_name]
        assert run.info.status == "FINISHED"
        assert run.data.params["lora.r"] == str(row["lora.r"]) and run.data.params["train.max_steps"] == "6"
        assert run.data.metrics["final.eval_ppl"] == pytest.approx(row["eval_ppl"])
        assert run.data.metrics["final.base_ppl"] == pytest.approx(row["base_ppl"])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [3, 6]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"samples.md", "leaderboard.md", "leaderboard.csv", "resolved_spec.yaml"} <= artifacts
    for tid in board:
        assert len(list((exp / layout.TENSORBOARD_DIR / tid).glob("events.out.tfevents.*"))) == 1
        assert not (exp / tid / layout.TRACKING_FILE).exists()


@needs_mlflow
def test_qlora_ray_train_logs_to_the_same_trackers(tiny_spec_file):
    from typer.testing import CliRunner

    from qlora_ray.cli import app

    store = tiny_spec_file.parent / "mlruns"
    result = CliRunner().invoke(app, ["train", str(tiny_spec_file), "--quiet", f"tracking.mlflow.tracking_uri=file:{store}",
                                      "tracking.mlflow.experiment=solo", "tracking.tensorboard=true"])
    assert result.exit_code == 0, result.output
    trial = tiny_spec_file.parent / "runs" / "tiny" / "tiny"
    final = json.loads((trial / layout.RESULT_FILE).read_text())["final"]
    client, runs = _runs(store, "solo")
    (run,) = runs
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED" and run.data.params["lora.r"] == "4"
    assert run.data.metrics["final.eval_ppl"] == pytest.approx(final["eval_ppl"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    assert "samples.md" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert len(list((trial.parent / layout.TENSORBOARD_DIR / "tiny").glob("events.out.tfevents.*"))) == 1
