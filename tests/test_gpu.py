"""GPU tier (``-m gpu``): the QLoRA path on CUDA with fp16 compute, as on a T4, and a real
``qlora-ray submit`` whose trial worker is placed on the GPU. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from qlora_ray.cli import app
from qlora_ray.results import FINISHED, read_leaderboard
from qlora_ray.spec import load_spec
from qlora_ray.train import RunContext, fit

pytestmark = pytest.mark.gpu
T4_GIB = 15


@pytest.fixture(autouse=True)
def _cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def test_fit_on_cuda_fp16_nf4(tiny_spec_file, tmp_path):
    import torch

    spec = load_spec(tiny_spec_file, ["quantization.compute_dtype=fp16", "resources.gpus_per_trial=1",
                                      "train.max_steps=12"])
    rows = []
    result = fit(spec, lambda m, c: rows.append(m), RunContext(trial_dir=str(tmp_path / "trial")))
    losses = [r["loss"] for r in rows if "loss" in r and not r.get("done")]
    assert result.step == 12 and losses[-1] < losses[0]
    assert 0 < result.peak_mem_gb < T4_GIB
    assert result.eval_ppl < result.base_ppl
    assert (tmp_path / "trial/adapter/adapter_model.safetensors").is_file()
    assert torch.cuda.max_memory_allocated() > 0  # the work really ran on the GPU


def test_submit_places_the_trial_on_the_gpu(tiny_spec_file):
    runner = CliRunner()
    result = runner.invoke(app, ["submit", str(tiny_spec_file), "resources.gpus_per_trial=1",
                                 "quantization.compute_dtype=fp16", "sweep={lora.r: [2, 4]}", "--no-dashboard"])
    assert result.exit_code == 0, result.output
    spec = load_spec(tiny_spec_file)
    board = read_leaderboard(spec.experiment_dir)
    assert len(board.rows) == 2
    for row in board.rows:
        assert row.status == FINISHED, row
        assert 0 < row.peak_mem_gb < T4_GIB


@pytest.mark.parametrize("runner", ["train", "tune"])
def test_fractional_gpus_run_trials_side_by_side(tiny_spec_file, runner):
    """``gpus_per_trial: 0.5``: both trials of the grid share the one GPU at the same time, in
    a Train worker each or (runner tune) in their Tune processes, which Ray gave the GPU."""
    import json
    from datetime import datetime

    result = CliRunner().invoke(app, ["submit", str(tiny_spec_file), "resources.gpus_per_trial=0.5",
                                      "resources.cpus_per_trial=1", "quantization.compute_dtype=fp16",
                                      f"resources.runner={runner}", "sweep={lora.r: [2, 4]}", "--no-dashboard"])
    assert result.exit_code == 0, result.output
    assert "2 at a time" in result.output
    spec = load_spec(tiny_spec_file)
    board = read_leaderboard(spec.experiment_dir)
    spans = []
    for row in board.rows:
        assert row.status == FINISHED, row
        status = json.loads((Path(spec.experiment_dir) / row.trial_id / "status.json").read_text())
        spans.append([datetime.fromisoformat(status[k]).timestamp() for k in ("started_at", "ended_at")])
        start = json.loads((Path(spec.experiment_dir) / row.trial_id / "events.jsonl").read_text().splitlines()[0])
        assert start["cuda_visible_devices"] == "0", start
    (a_start, a_end), (b_start, b_end) = spans
    assert a_start < b_end and b_start < a_end  # the two trials overlapped in time
