"""``train.fused``: the fused QLoRA layers in the training loop on the tiny NF4 model (CPU, fp32)
train like the peft path, resume exactly, save a standard peft adapter, and leave evaluation to
the model's own forwards; ``auto`` falls back with a reason, ``true`` refuses what it cannot run."""

from __future__ import annotations

import pytest
import torch

from qlora_ray import kernels
from qlora_ray import train as training
from qlora_ray.errors import UserError
from qlora_ray.evaluate import perplexity
from qlora_ray.model import load_adapter
from qlora_ray.train import fused as fused_module
from test_train import Killed, run_fit, tiny_spec


class FuseCounter:
    """Counts how often the loop put the model on the fused path."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = kernels.fuse

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(kernels, "fuse", counted)


def test_fused_and_peft_paths_train_alike(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    counter = FuseCounter(monkeypatch)
    common = ["lora.dropout=0.0", "train.max_steps=4"]
    (tmp_path / "peft").mkdir(), (tmp_path / "fused").mkdir()
    peft = tiny_spec(tmp_path / "peft", tiny_model_dir, tiny_data_dir, common + ["train.fused=false"])
    fused = tiny_spec(tmp_path / "fused", tiny_model_dir, tiny_data_dir, common + ["train.fused=true"])
    peft_result, peft_reports = run_fit(peft, tmp_path / "peft" / "trial")
    assert counter.calls == 0
    fused_result, fused_reports = run_fit(fused, tmp_path / "fused" / "trial")
    assert counter.calls == 2  # the probe at setup, then the training steps
    losses = [m["loss"] for m, _ in fused_reports]
    assert losses == pytest.approx([m["loss"] for m, _ in peft_reports], rel=1e-4)
    assert fused_result.eval_ppl == pytest.approx(peft_result.eval_ppl, rel=1e-4)
    assert fused_result.base_ppl == pytest.approx(peft_result.base_ppl, rel=1e-6)
    # A standard peft adapter: reloaded by peft alone, it measures what the trial measured.
    model, tokenizer, dtype, spec = load_adapter(fused_result.adapter_dir)
    assert not any("forward" in vars(m) for m in model.modules())  # the model's own forwards
    from qlora_ray import data

    prepared = data.prepare(spec.data, tokenizer)
    ppl, _ = perplexity(model, data.eval_batches(prepared, spec.eval.batch_size), dtype)
    assert ppl == pytest.approx(fused_result.eval_ppl, rel=1e-5)


def test_a_resumed_fused_run_matches_an_uninterrupted_one(tmp_path, tiny_model_dir, tiny_data_dir):
    # LoRA dropout on: the fused path draws its masks from the RNG a resume must restore.
    spec = tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, ["train.fused=true"])
    whole, whole_reports = run_fit(spec, tmp_path / "whole")
    trial = tmp_path / "trial"
    with pytest.raises(Killed):
        run_fit(spec, trial, kill_at=3)
    resumed, reports = run_fit(spec, trial, resume_from=str(trial / "checkpoints" / "step_3"))
    assert [m["step"] for m, _ in reports] == [4, 5, 6]
    expected = [m["loss"] for m, _ in whole_reports[3:6]]
    assert [m["loss"] for m, _ in reports] == pytest.approx(expected, rel=1e-5)
    assert resumed.eval_ppl == pytest.approx(whole.eval_ppl, rel=1e-5)


def test_auto_falls_back_with_the_reason_and_true_refuses(tmp_path, tiny_model_dir, tiny_data_dir):
    said = []
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))  # nothing the kernels can fuse
    auto = tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, ["train.fused=auto"])
    enter = fused_module.choose(plain, auto, torch.float32, said.append)
    with enter():
        pass
    assert len(said) == 1 and "peft path" in said[0] and "no peft LoRA" in said[0]
    strict = tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, ["train.fused=true"])
    with pytest.raises(UserError, match="train.fused: true, but"):
        fused_module.choose(plain, strict, torch.float32, said.append)
    int8 = tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, ["quantization.mode=int8", "train.fused=true"])
    with pytest.raises(UserError, match="int8"):
        fused_module.choose(plain, int8, torch.float32, said.append)
    off = tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, ["train.fused=false"])
    assert fused_module.choose(plain, off, torch.float32, said.append) is not None and len(said) == 1


def test_fused_is_validated(tmp_path, tiny_model_dir, tiny_data_dir):
    from qlora_ray.spec import SpecError

    with pytest.raises(SpecError, match="train.fused"):
        tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, ["train.fused=sometimes"])
    assert tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, ["train.fused=true"]).train.fused_mode == "true"
