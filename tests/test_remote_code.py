"""An adapter folder does not decide whether a model's own code runs: ``chat``, ``eval`` and
``merge``, ``export`` and ``push`` run a base model's custom code only with ``--trust-remote-code`` on their command line,
and name the base model and revision they are about to load. The "custom code" here is real: a
model folder whose config maps to a Python file that leaves a marker when it is imported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qlora_ray.cli import app

CUSTOM_CODE = '''\
import pathlib
pathlib.Path({marker!r}).write_text("the model's own code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class MarkedConfig(LlamaConfig):
    model_type = "llama"


class MarkedModel(LlamaForCausalLM):
    config_class = MarkedConfig
'''


@pytest.fixture
def shared_adapter(tmp_path, tiny_spec_file, tiny_model_dir):
    """A trained adapter whose spec was edited to point at a model with custom code and to ask
    for ``model.trust_remote_code: true`` (what someone sharing a folder could do); the marker path."""
    trained = CliRunner().invoke(app, ["train", str(tiny_spec_file), "train.max_steps=1", "--quiet"])
    assert trained.exit_code == 0, trained.output
    custom = tmp_path / "custom_model"
    shutil.copytree(tiny_model_dir, custom)
    marker = tmp_path / "custom-code-ran"
    (custom / "marked.py").write_text(CUSTOM_CODE.format(marker=str(marker)), encoding="utf-8")
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "marked.MarkedConfig", "AutoModelForCausalLM": "marked.MarkedModel"}
    (custom / "config.json").write_text(json.dumps(config), encoding="utf-8")
    adapter = tiny_spec_file.parent / "runs" / "tiny" / "tiny" / "adapter"
    spec_file = adapter / "qlora_ray_spec.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    spec["model"].update(name=str(custom), trust_remote_code=True)
    spec_file.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return adapter, custom, marker


def test_an_adapter_cannot_switch_remote_code_on(shared_adapter, tmp_path, tiny_data_dir):
    adapter, custom, marker = shared_adapter
    runner = CliRunner()
    for args in (["chat", str(adapter), "-p", "hi", "--max-new-tokens", "2"],
                 ["eval", str(adapter), "--data", str(tiny_data_dir / "eval.jsonl")],
                 ["merge", str(adapter), str(tmp_path / "merged")],
                 ["export", str(adapter), str(tmp_path / "exported")],
                 ["push", str(adapter), "me/x", "--dry-run"]):
        refused = runner.invoke(app, args)
        assert refused.exit_code == 2, refused.output
        assert "--trust-remote-code" in refused.output and str(custom) in refused.output
        assert "Nothing was loaded" in refused.output
        assert not marker.exists()
    assert not (tmp_path / "merged").exists() and not (tmp_path / "exported").exists()

    allowed = runner.invoke(app, ["chat", str(adapter), "-p", "hi", "--max-new-tokens", "2", "--trust-remote-code"])
    assert f"on base model '{custom}' @ default revision (unpinned)" in allowed.output.replace("\n", "")
    assert marker.exists()  # asked for on the command line: the model's code did run


def test_commands_name_the_base_model_they_load(tiny_spec_file, tiny_model_dir):
    runner = CliRunner()
    trained = runner.invoke(app, ["train", str(tiny_spec_file), "train.max_steps=1", "--quiet"])
    assert trained.exit_code == 0, trained.output
    out = runner.invoke(app, ["chat", str(tiny_spec_file.parent / "runs" / "tiny"), "-p", "hi",
                              "--max-new-tokens", "2"])
    assert out.exit_code == 0, out.output
    assert f"on base model '{tiny_model_dir}' @ default revision (unpinned)" in out.output.replace("\n", "")
