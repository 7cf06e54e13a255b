"""A full disk at any write after the checkpoints (the metric rows, the final adapter, samples.md,
result.json, the leaderboard) is a :class:`DiskFullError` that says what and where, as it is for
checkpoints (``test_train``): a UserError, so the CLI exits 2 and the Ray worker ends the trial
instead of being restarted on the same full disk.

Filling a real disk at exactly one write is not possible here without mounting file systems,
so each test makes that one writer fail the way a full disk does (OSError ENOSPC)."""

from __future__ import annotations

import errno
import os

import pytest

from conftest import write_tiny_spec
from qlora_ray import results, storage, train
from qlora_ray.errors import DiskFullError, UserError
from qlora_ray.spec import load_spec
from qlora_ray.train import loop as loop_module


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("site", ["metrics", "adapter", "samples"])
def test_full_disk_at_a_final_write_is_a_clear_error(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch, site):
    spec = load_spec(write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir,
                                     train="{max_steps: 2, batch_size: 4, log_every: 1, gradient_checkpointing: false}",
                                     eval=f"{{prompts: {tiny_data_dir}/prompts.txt, max_new_tokens: 2}}"))
    trial = tmp_path / "trial"
    if site == "metrics":
        real_open = open

        def full_open(file, mode="r", *args, **kwargs):
            if str(file).endswith("metrics.jsonl") and "a" in mode:
                _enospc()
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(loop_module, "open", full_open, raising=False)
        what = f"the step-1 row of metrics.jsonl to {trial}"
    elif site == "adapter":
        monkeypatch.setattr(loop_module, "save_adapter", _enospc)
        what = f"the final adapter to {trial / 'adapter'}"
    else:
        monkeypatch.setattr(loop_module, "write_samples", _enospc)
        what = f"samples.md to {trial}"
    with pytest.raises(DiskFullError) as caught:
        train.fit(spec, lambda metrics, checkpoint: None, train.RunContext(trial_dir=str(trial)))
    assert str(caught.value) == f"no space left on device while writing {what}: free space there or point output.dir elsewhere"
    assert isinstance(caught.value, UserError) and caught.value.errno == errno.ENOSPC
    assert not (trial / "result.json").exists()


def test_full_disk_at_the_leaderboard_is_a_clear_error(tmp_path, monkeypatch):
    exp = tmp_path / "exp"
    exp.mkdir()
    monkeypatch.setattr(results, "write_leaderboard", _enospc)
    with pytest.raises(DiskFullError) as caught:
        storage.write_results(str(exp))
    assert str(caught.value) == (f"no space left on device while writing the leaderboard to {exp}: "
                                 "free space there or point output.dir elsewhere")
