"""The training loop on a tiny random Llama with real bitsandbytes NF4 on the CPU: it learns,
checkpoints, resumes exactly (same steps, same batches, same loss), falls back from a corrupt
checkpoint, and stops on a non-finite loss. Plus ``qlora-ray train`` and the slow/gpu smoke runs."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qlora_ray import train as training
from qlora_ray.train import checkpoint as checkpoint_module
from qlora_ray.train import step as step_module
from qlora_ray.cli import app
from qlora_ray.spec import TrainSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]
SMOKE_JOB = ROOT / "jobs" / "hinglish_smoke.yaml"
FINAL_KEYS = {"step", "train_loss", "eval_ppl", "base_ppl", "ppl_change", "tokens_per_s", "peak_mem_gb",
              "wall_s", "train_s"}


def tiny_spec(folder: Path, model_dir: Path, data_dir: Path, overrides=()):
    """The conftest tiny spec (NF4, fp32 compute) with 2 micro-batches per step, so 6 steps cross
    the epoch boundary, and LoRA dropout on, so a resume must restore the RNG too."""
    path = folder / "tiny.yaml"
    path.write_text(f"""\
name: tiny
model: {{name: {model_dir}}}
data: {{train: {data_dir}/train.jsonl, eval: {data_dir}/eval.jsonl, max_seq_len: 64, cache_dir: {folder}/cache}}
quantization: {{mode: nf4, compute_dtype: fp32}}
lora: {{r: 4, alpha: 8, dropout: 0.1}}
train: {{lr: 2.0e-2, max_steps: 6, batch_size: 4, grad_accum: 2, warmup_ratio: 0.2, checkpoint_every: 3,
         log_every: 1, gradient_checkpointing: false}}
eval: {{prompts: {data_dir}/prompts.txt, max_new_tokens: 4}}
resources: {{gpus_per_trial: 0}}
output: {{dir: {folder}/runs}}
""", encoding="utf-8")
    return load_spec(path, list(overrides))


class Recorder:
    """Wraps the step's model forward: a fingerprint of every micro-batch trained on."""

    def __init__(self, monkeypatch, fail_at=None):
        self.seen, self.fail_at = [], fail_at
        real = step_module.model_loss

        def wrapped(model, batch, dtype):
            self.seen.append(hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()[:12])
            loss, count = real(model, batch, dtype)
            if self.fail_at is not None and len(self.seen) == self.fail_at:
                loss = loss * float("inf")
            return loss, count

        monkeypatch.setattr(step_module, "model_loss", wrapped)


class Killed(Exception):
    pass


def run_fit(spec, trial_dir, resume_from=None, kill_at=None):
    reports = []

    def report(metrics, checkpoint):
        reports.append((dict(metrics), checkpoint))
        if kill_at is not None and metrics.get("step") == kill_at:
            raise Killed(f"killed after step {kill_at}")

    ctx = training.RunContext(trial_dir=str(trial_dir), resume_from=resume_from)
    result = training.fit(spec, report, ctx)
    return result, reports


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """One uninterrupted 6-step run, with the fingerprints of the batches it trained on."""
    mp = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("reference")
    spec = tiny_spec(folder, tiny_model_dir, tiny_data_dir)
    recorder = Recorder(mp)
    try:
        result, reports = run_fit(spec, folder / "trial")
    finally:
        mp.undo()
    return {"spec": spec, "folder": folder, "trial": folder / "trial", "result": result,
            "reports": reports, "batches": recorder.seen}


def test_fit_trains_and_writes_the_trial_folder(reference):
    result, reports, trial = reference["result"], reference["reports"], reference["trial"]
    assert result.step == 6 and result.total_steps == 6
    # The model learns: tuned perplexity on the held-out set is below the base's, loss falls.
    assert result.eval_ppl < result.base_ppl
    assert result.ppl_change == pytest.approx(result.eval_ppl / result.base_ppl - 1)
    losses = [m["loss"] for m, _ in reports]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # Checkpoints are reported at steps 3 and 6; every report is a step row (no flag rides in it).
    assert [(m["step"], Path(c).name) for m, c in reports if c] == [(3, "step_3"), (6, "step_6")]
    assert all("done" not in m and "final" not in m for m, _ in reports)
    # The final figures are the result, stored once: result.json.
    final = json.loads((trial / "result.json").read_text())
    assert final["schema"] == 1 and final["error"] is None
    final = final["final"]
    assert FINAL_KEYS <= set(final) and final == result.fields()
    assert all(math.isfinite(final[k]) for k in FINAL_KEYS)
    assert final["tokens_per_s"] > 0 and final["peak_mem_gb"] > 0
    # 8 micro-batches of 4 packed rows per epoch: step 4 starts epoch 1.
    assert [m["epoch"] for m, _ in reports[:6]] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert {p.name for p in trial.iterdir()} >= {"resolved_spec.yaml", "metrics.jsonl", "result.json", "samples.md",
                                                 "adapter", "checkpoints", "baseline.json"}
    rows = [json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and {r["schema"] for r in rows} == {1}
    assert {p.name for p in (trial / "adapter").iterdir()} >= {
        "adapter_config.json", "adapter_model.safetensors", "qlora_ray_spec.yaml", "tokenizer.json"}
    checkpoint_files = {p.name for p in (trial / "checkpoints" / "step_6").iterdir()}
    assert checkpoint_files == {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt",
                                "state.json", "spec.yaml", "manifest.json"}
    samples = (trial / "samples.md").read_text()
    assert "| 1 | Chai kaise banate hain? |" in samples and "| 2 | Kal barish hogi? |" in samples


def test_base_figures_measured_alongside_or_after_training(reference, tmp_path):
    """With ``base_figures`` (the runtime's base-model task running beside the trial), training
    starts at once and the figures are taken after it; if they are not ready the trial measures
    the base model itself, adapter off, and gets what it would have measured before training."""
    from qlora_ray.evaluate import Baseline

    asked = []

    def elsewhere():
        asked.append(True)
        return Baseline(perplexity=123.0, target_tokens=7, replies=["base says A", "base says B"])

    trial = tmp_path / "given"
    result = training.fit(reference["spec"], lambda m, c: None,
                          training.RunContext(trial_dir=str(trial), base_figures=elsewhere))
    assert asked == [True] and result.base_ppl == 123.0
    assert result.eval_ppl == pytest.approx(reference["result"].eval_ppl, rel=1e-5)  # the same training
    assert not (trial / "baseline.json").exists()
    assert "base says A" in (trial / "samples.md").read_text()

    trial = tmp_path / "not_ready"
    result = training.fit(reference["spec"], lambda m, c: None,
                          training.RunContext(trial_dir=str(trial), base_figures=lambda: None))
    assert result.base_ppl == pytest.approx(reference["result"].base_ppl, rel=1e-5)
    assert json.loads((trial / "baseline.json").read_text())["perplexity"] == result.base_ppl


def test_peak_memory_starts_again_for_each_trial_in_a_process():
    """Tune hands finished trial processes to the next trial (runner tune): each trial's peak
    memory is its own, not the largest of the trials that ran in the process before it."""
    import numpy as np

    big = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    high = training.peak_memory_gb("cpu")
    del big
    training.reset_peak_memory()
    assert high - training.peak_memory_gb("cpu") > 0.3


def test_killed_run_resumes_exactly(reference, tmp_path, monkeypatch):
    spec, trial = reference["spec"], tmp_path / "trial"
    recorder = Recorder(monkeypatch)
    with pytest.raises(Killed):
        run_fit(spec, trial, kill_at=3)
    assert [p.name for p in training.checkpoints(trial)] == ["step_3"]
    assert len(recorder.seen) == 6  # 3 steps x 2 micro-batches

    result, reports = run_fit(spec, trial, resume_from=str(trial / "checkpoints" / "step_3"))
    assert result.step == reference["result"].step == 6
    assert [m["step"] for m, _ in reports] == [4, 5, 6]
    # Same batches in the same order (the resumed epoch skips what was trained), same losses.
    assert recorder.seen == reference["batches"]
    expected = [m["loss"] for m, _ in reference["reports"][3:6]]
    assert [m["loss"] for m, _ in reports[:3]] == pytest.approx(expected, rel=1e-5)
    assert result.train_loss == pytest.approx(reference["result"].train_loss, rel=1e-5)
    assert result.eval_ppl == pytest.approx(reference["result"].eval_ppl, rel=1e-5)
    assert result.base_ppl == pytest.approx(reference["result"].base_ppl, rel=1e-9)
    steps = [json.loads(line)["step"] for line in (trial / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_corrupt_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, caplog):
    trial = tmp_path / "trial"
    shutil.copytree(reference["trial"] / "checkpoints", trial / "checkpoints")
    optimizer = trial / "checkpoints" / "step_6" / "optimizer.pt"
    blob = bytearray(optimizer.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(blob))
    assert "sha256" in training.checkpoint_problem(optimizer.parent)

    with caplog.at_level(logging.WARNING, logger="qlora_ray.train"):
        result, reports = run_fit(reference["spec"], trial, resume_from=str(optimizer.parent))
    assert "step_6 is unusable" in caplog.text and "earlier checkpoint" in caplog.text
    assert [m["step"] for m, _ in reports] == [4, 5, 6]
    assert result.train_loss == pytest.approx(reference["result"].train_loss, rel=1e-5)


def test_half_written_checkpoint_is_detected(tmp_path):
    folder = tmp_path / "checkpoints" / "step_9"
    folder.mkdir(parents=True)
    (folder / "optimizer.pt").write_bytes(b"partial")
    assert "no manifest" in training.checkpoint_problem(folder)
    assert training.latest_checkpoint(tmp_path) is None
    assert training.checkpoints(tmp_path) == [folder]


class FullDisk:
    """``open`` for the checkpoint writer: once ``full`` is set, files opened for writing
    under ``root`` take ``room`` more bytes in all, then the write fails with ``code`` (ENOSPC:
    what a full disk does to a write; part of the data is on disk)."""

    def __init__(self, root: Path, code: int, room: int = 1000):
        self.root, self.code, self.room, self.full = str(root), code, room, False

    def __call__(self, file, mode="r", *args, **kwargs):
        import builtins
        import os

        real = builtins.open(file, mode, *args, **kwargs)
        if not self.full or "w" not in mode or not str(file).startswith(self.root):
            return real
        disk = self

        class Writer:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                real.close()

            def write(self, blob):
                data = bytes(blob)
                if len(data) > disk.room:
                    real.write(data[:disk.room])
                    disk.room = 0
                    raise OSError(disk.code, os.strerror(disk.code))
                disk.room -= len(data)
                return real.write(data)

        return Writer()


@pytest.mark.parametrize("how", ["disk full mid-file", "quota in torch.save"])
def test_full_disk_while_checkpointing_is_a_clear_error(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch, how):
    """The disk fills up after the step-3 checkpoint: the step-6 one fails with a message that says
    so and where, as a DiskFullError (a UserError and an OSError with the errno); its temp folder
    is gone and the step-3 checkpoint is untouched, so a resume after freeing space works."""
    import errno

    from qlora_ray.errors import DiskFullError, UserError

    spec = tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir)
    trial = tmp_path / "trial"
    root = trial / "checkpoints"
    if how == "disk full mid-file":
        code, words = errno.ENOSPC, "no space left on device"
        disk = FullDisk(root, code)
        monkeypatch.setattr(checkpoint_module, "open", disk, raising=False)
    else:
        code, words = errno.EDQUOT, "disk quota exceeded"
        disk = FullDisk(root, code)
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if disk.full:
                raise OSError(code, "Disk quota exceeded")
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)

    def report(metrics, checkpoint):
        if checkpoint:  # step 3's checkpoint is on disk; the disk is full from now on
            disk.full = True

    with pytest.raises(DiskFullError) as caught:
        training.fit(spec, report, training.RunContext(trial_dir=str(trial)))
    error = caught.value
    assert str(error) == (f"{words} while writing checkpoint step_6 to {root}: "
                          "free space there or point output.dir elsewhere")
    assert isinstance(error, UserError) and isinstance(error, OSError) and error.errno == code
    assert isinstance(error.__cause__, OSError) and error.__cause__.errno == code
    assert sorted(p.name for p in root.iterdir()) == ["step_3"]  # no .step_6.* temp folder left
    assert training.checkpoint_problem(root / "step_3") is None
    assert training.latest_checkpoint(trial) == root / "step_3"
    assert not (trial / "adapter").exists()


def test_resume_prefers_a_newer_sound_checkpoint_than_the_one_ray_hands_back(reference, tmp_path, caplog):
    """After a driver kill Ray Train can hand back an older checkpoint than the newest the worker
    wrote (its record lags the reports). The trial folder's newer one wins when it is sound and
    metrics.jsonl has its row; else Ray's is used (or, if Ray's is torn, the newest sound one)."""
    trial = tmp_path / "trial"
    shutil.copytree(reference["trial"] / "checkpoints", trial / "checkpoints")
    metrics = (reference["trial"] / "metrics.jsonl").read_text()
    (trial / "metrics.jsonl").write_text(metrics)
    step_3, step_6 = trial / "checkpoints" / "step_3", trial / "checkpoints" / "step_6"
    ray_3 = tmp_path / "_ray" / "train" / "trial" / "checkpoint_000000"  # Ray's copies, Ray's names
    ray_6 = ray_3.with_name("checkpoint_000001")
    shutil.copytree(step_3, ray_3)
    shutil.copytree(step_6, ray_6)

    with caplog.at_level(logging.WARNING, logger="qlora_ray.train"):
        assert training.find_checkpoint(str(ray_3), trial) == step_6
    assert f"checkpoint {ray_3} (step 3) is older than {step_6} in the trial folder" in caplog.text
    assert training.find_checkpoint(str(ray_6), trial) == ray_6  # nothing newer: Ray's, as handed back
    assert training.find_checkpoint(str(step_3), trial) == step_6

    # The worker died between writing step_6 and its metrics row: resuming there would leave a
    # gap in the history, so Ray's step 3 stands.
    rows = [line for line in metrics.splitlines() if json.loads(line)["step"] != 6]
    (trial / "metrics.jsonl").write_text("".join(line + "\n" for line in rows))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qlora_ray.train"):
        assert training.find_checkpoint(str(ray_3), trial) == ray_3
    assert "step_6 has no row in metrics.jsonl" in caplog.text
    (trial / "metrics.jsonl").write_text(metrics)

    # Ray's copy torn: the newer sound one; the newer one damaged too: the trial folder's step 3.
    adapter = ray_3 / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    assert training.find_checkpoint(str(ray_3), trial) == step_6
    (step_6 / "manifest.json").unlink()
    assert training.find_checkpoint(str(ray_3), trial) == step_3

    # fit itself resumes from the newer checkpoint: at step 6 of 6 only the evaluation is left.
    shutil.rmtree(step_6)
    shutil.copytree(reference["trial"] / "checkpoints" / "step_6", step_6)
    shutil.rmtree(ray_3)
    shutil.copytree(step_3, ray_3)
    result, reports = run_fit(reference["spec"], trial, resume_from=str(ray_3))
    assert reports == [] and result.step == 6
    assert result.train_loss == pytest.approx(reference["result"].train_loss, rel=1e-5)


def test_non_finite_loss_stops_the_trial(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    spec = tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, ["train.grad_accum=1"])
    Recorder(monkeypatch, fail_at=3)
    with pytest.raises(training.NonFiniteLossError, match=r"step 3: training loss is inf") as caught:
        run_fit(spec, tmp_path / "trial")
    assert caught.value.step == 3 and caught.value.loss == math.inf
    assert not (tmp_path / "trial" / "adapter").exists()


@pytest.mark.parametrize("scheduler, expected", [
    ("cosine", [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]),
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_learning_rate_schedule(scheduler, expected):
    t = TrainSpec(warmup_ratio=0.3, scheduler=scheduler)
    assert [round(training.lr_factor(s, t, 6), 3) for s in range(6)] == expected


def test_train_command_trains_and_resumes(tiny_spec_file):
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(tiny_spec_file), "train.max_steps=2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "tuned eval ppl" in result.output and "adapter:" in result.output
    trial = tiny_spec_file.parent / "runs" / "tiny" / "tiny"
    assert (trial / "adapter" / "adapter_model.safetensors").is_file()
    # A second run of a finished trial trains nothing and rewrites nothing (peak memory stays).
    result_before = (trial / "result.json").read_text()
    again = runner.invoke(app, ["train", str(tiny_spec_file), "train.max_steps=2", "--quiet"])
    assert again.exit_code == 0, again.output
    assert "trial tiny is already finished" in again.output and "--fresh" in again.output
    assert "resuming from" not in again.output
    assert (trial / "result.json").read_text() == result_before
    # More steps: it trains on from the final checkpoint.
    more = runner.invoke(app, ["train", str(tiny_spec_file), "train.max_steps=3", "--quiet"])
    assert more.exit_code == 0, more.output
    assert "resuming from" in more.output and "step_2" in more.output
    assert json.loads((trial / "result.json").read_text())["final"]["step"] == 3


def test_resume_under_a_changed_spec_is_refused(tiny_spec_file):
    """A checkpoint carries the spec it was trained under; a resume under a spec that differs in a
    key that changes training (lr, r) is refused, exit 2, naming the keys and --fresh, with nothing
    written; keys that may change (max_steps, eval settings) resume."""
    runner = CliRunner()
    first = runner.invoke(app, ["train", str(tiny_spec_file), "train.max_steps=2", "--quiet"])
    assert first.exit_code == 0, first.output
    trial = tiny_spec_file.parent / "runs" / "tiny" / "tiny"
    assert (trial / "checkpoints" / "step_2" / "spec.yaml").is_file()
    saved = (trial / "resolved_spec.yaml").read_text()
    files = sorted(p.name for p in trial.rglob("*"))
    changed = runner.invoke(app, ["train", str(tiny_spec_file), "train.max_steps=4", "train.lr=1.0e-5",
                                  "lora.r=8", "--quiet"])
    assert changed.exit_code == 2, changed.output
    assert "train.lr: 0.005 -> 1e-05" in changed.output and "lora.r: 4 -> 8" in changed.output
    assert "--fresh" in changed.output and "max_steps" not in changed.output
    assert (trial / "resolved_spec.yaml").read_text() == saved  # the check comes before any write
    assert sorted(p.name for p in trial.rglob("*")) == files
    same = runner.invoke(app, ["train", str(tiny_spec_file), "train.max_steps=3", "eval.max_new_tokens=2",
                               "--quiet"])
    assert same.exit_code == 0, same.output
    assert "resuming from" in same.output and "step_2" in same.output


def test_train_fresh_moves_the_previous_trial_aside(tiny_spec_file):
    """``train --fresh`` keeps the previous run: its folder moves to <name>.old-<time>/ first."""
    runner = CliRunner()
    first = runner.invoke(app, ["train", str(tiny_spec_file), "train.max_steps=2", "--quiet"])
    assert first.exit_code == 0, first.output
    runs = tiny_spec_file.parent / "runs"
    old_rows = (runs / "tiny" / "tiny" / "metrics.jsonl").read_text()
    fresh = runner.invoke(app, ["train", str(tiny_spec_file), "train.max_steps=1", "--fresh", "--quiet"])
    assert fresh.exit_code == 0, fresh.output
    aside = [p for p in runs.iterdir() if p.name.startswith("tiny.old-")]
    assert len(aside) == 1 and f"moved the previous trial folder to {aside[0] / 'tiny'}" in fresh.output.replace("\n", "")
    assert (aside[0] / "tiny" / "metrics.jsonl").read_text() == old_rows
    assert (aside[0] / "tiny" / "checkpoints" / "step_2" / "manifest.json").is_file()
    assert json.loads((runs / "tiny" / "tiny" / "result.json").read_text())["final"]["step"] == 1


def test_train_command_errors_exit_2(tiny_spec_file):
    runner = CliRunner()
    swept = runner.invoke(app, ["train", str(tiny_spec_file), "--trial", "nope"])
    assert swept.exit_code == 2 and "no trial 'nope'" in swept.output
    bad = runner.invoke(app, ["train", str(tiny_spec_file), "train.lr=7"])
    assert bad.exit_code == 2 and "train.lr" in bad.output


# ---------------------------------------------------------------- real model tiers

def _smoke(extra=()):
    runner = CliRunner()
    start = time.time()
    result = runner.invoke(app, ["train", str(SMOKE_JOB), "--fresh", "--quiet", *extra])
    wall = time.time() - start
    assert result.exit_code == 0, result.output
    spec = load_spec(SMOKE_JOB, [e for e in extra if "=" in e])
    trial = Path(spec.experiment_dir) / spec.name
    final = json.loads((trial / "result.json").read_text())["final"]
    print(f"\nsmoke: wall {wall:.0f}s, base ppl {final['base_ppl']:.2f} -> tuned {final['eval_ppl']:.2f} "
          f"({final['ppl_change']:+.1%}), {final['tokens_per_s']:.0f} tokens/s, peak {final['peak_mem_gb']:.2f} GiB")
    print((trial / "samples.md").read_text())
    return final, trial


@pytest.mark.slow
def test_smoke_job_on_offline_smollm2(smollm2_gguf, tmp_path):
    """`qlora-ray train jobs/hinglish_smoke.yaml` on the CPU: a large perplexity drop in minutes."""
    final, trial = _smoke()
    assert final["step"] == load_spec(SMOKE_JOB).train.max_steps
    assert final["ppl_change"] < -0.3
    assert (trial / "samples.md").is_file()


@pytest.mark.gpu
def test_smoke_job_on_cuda_fp16_nf4(smollm2_gguf, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    final, trial = _smoke(["resources.gpus_per_trial=1",
                           "quantization.mode=nf4", "quantization.compute_dtype=fp16"])
    assert final["ppl_change"] < -0.3
    resolved = (trial / "resolved_spec.yaml").read_text()
    assert "compute_dtype: fp16" in resolved
    assert final["peak_mem_gb"] < 15  # fits a T4


def test_auto_checkpointing_switches_on_when_a_step_runs_out_of_memory(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                       monkeypatch):
    """``gradient_checkpointing: auto`` trains without recomputation; a step that runs out of GPU
    memory is retried with it on. A CPU cannot run out of CUDA memory, so the first step's loss
    raises torch's own OutOfMemoryError here; the retry and the rest of the run are real."""
    from qlora_ray.model import gradient_checkpointing_on

    spec = tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, ["train.gradient_checkpointing=auto", "train.max_steps=3"])
    real, states = step_module.model_loss, []

    def flaky(model, batch, dtype):
        states.append(gradient_checkpointing_on(model))
        if len(states) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, batch, dtype)

    monkeypatch.setattr(step_module, "model_loss", flaky)
    result, reports = run_fit(spec, tmp_path / "trial")
    assert result.step == 3 and math.isfinite(result.train_loss)
    assert states[0] is False and all(states[1:])  # off at first, on from the retry onwards
    assert [r["step"] for r, _ in reports] == [1, 2, 3]

    (tmp_path / "on").mkdir()
    on = tiny_spec(tmp_path / "on", tiny_model_dir, tiny_data_dir, ["train.gradient_checkpointing=true"])
    states.clear()
    with pytest.raises(training.OutOfMemory, match=r"step 1: out of GPU memory with gradient checkpointing on.*"
                                                   r"train\.batch_size"):
        run_fit(on, tmp_path / "trial-on")


class _Payload:
    """What an attacker plants in a checkpoint: unpickling it would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_not_run(reference, tmp_path):
    """A shared output folder lets others write checkpoints, and the sha256 manifest only proves
    that nothing was damaged: an ``rng.pt`` replaced by a pickle payload, manifest re-hashed, is
    refused with a clear error on resume, and the payload never runs."""
    import hashlib as _hashlib

    from qlora_ray.errors import UserError

    trial = tmp_path / "trial"
    shutil.copytree(reference["trial"] / "checkpoints", trial / "checkpoints")
    step_6 = trial / "checkpoints" / "step_6"  # the newest: nothing else to fall back to
    marker = tmp_path / "payload-ran"
    torch.save({"python": _Payload(marker)}, step_6 / "rng.pt")
    manifest = json.loads((step_6 / "manifest.json").read_text())
    blob = (step_6 / "rng.pt").read_bytes()
    manifest["files"]["rng.pt"] = {"bytes": len(blob), "sha256": _hashlib.sha256(blob).hexdigest()}
    (step_6 / "manifest.json").write_text(json.dumps(manifest))
    assert training.checkpoint_problem(step_6) is None  # the manifest cannot tell

    with pytest.raises(UserError) as caught:
        run_fit(reference["spec"], trial, resume_from=str(step_6))
    message = str(caught.value)
    assert message.startswith(f"{step_6 / 'rng.pt'}: refused to load: it holds Python objects"), message
    assert "GLOBAL posix.system" in message and "Nothing from it was run" in message
    assert not marker.exists()


def test_rng_state_is_plain_data(tmp_path):
    """Every stream survives a weights_only round trip: the checkpoint needs no pickled objects."""
    import random

    import numpy as np

    checkpoint_module.seed_everything(7)
    path = tmp_path / "rng.pt"
    torch.save(checkpoint_module._rng_state(), path)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    checkpoint_module._set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_forgetting_later_rows_rewrites_metrics_atomically(tmp_path, monkeypatch):
    """Resuming at step 2 drops later rows; a failure while rewriting leaves the file as it was."""
    import os

    from qlora_ray.records import StepMetrics, to_line

    trial = tmp_path / "trial"
    trial.mkdir()
    metrics = trial / "metrics.jsonl"
    original = "".join(to_line(StepMetrics(step=s, loss=1.0)) for s in (1, 2, 3, 4))
    metrics.write_text(original)

    def broken(src, dst):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", broken)
        with pytest.raises(OSError):
            checkpoint_module.forget_after(trial, 2)
    assert metrics.read_text() == original and sorted(p.name for p in trial.iterdir()) == ["metrics.jsonl"]
    checkpoint_module.forget_after(trial, 2)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
