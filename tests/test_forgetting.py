"""A trial that buys its gain by forgetting is not picked as best.

A tiny Llama is first taught the ChatML chats (full fine-tuning, deterministic on the CPU), so
it has a chat format to lose. Two trials of one experiment then train LoRA on an NF4 base:
``chat`` on the conversations through the chat template, ``raw`` on the same conversations as
plain ``text`` rows (no template). Both are measured on a control set of ChatML chats. The raw
trial gains more on its own eval set (its ``ppl_change`` is lower) while its control perplexity
rises steeply; with ``results.max_control_increase`` it is passed over, without it it wins.
No Ray: the trials run through ``train.fit`` into one experiment folder, as ``submit`` lays it out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_CHATS, tiny_rows, write_jsonl
from qlora_ray import results, train
from qlora_ray.spec import load_spec


def _raw(chat) -> dict:
    return {"text": "\n".join(f"{role}: {content}" for role, content in chat)}


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model after learning the ChatML chats (every token), saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    texts = [tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in chat], tokenize=False)
             for chat in TINY_CHATS]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(120):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("chat_llama")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _spec(folder: Path, model: Path, name: str, data: str, lr: float) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        f"name: forget\nmodel: {{name: {model}}}\n"
        f"data: {{{data}, max_seq_len: 96, packing: false, cache_dir: {folder}/cache}}\n"
        "quantization: {mode: nf4, compute_dtype: fp32}\nlora: {r: 8, alpha: 16, dropout: 0.0}\n"
        f"train: {{lr: {lr}, max_steps: 24, batch_size: 4, warmup_ratio: 0.0, scheduler: constant, "
        "gradient_checkpointing: false, seed: 0}\n"
        f"eval: {{control: {folder}/control.jsonl}}\n"
        "results: {select: ppl_change, max_control_increase: 0.10}\n"
        "resources: {gpus_per_trial: 0}\n"
        f"output: {{dir: {folder}/runs}}\n", encoding="utf-8")
    return path


def test_a_trial_that_forgets_is_not_selected(chat_model_dir, tmp_path):
    rows = tiny_rows()
    write_jsonl(tmp_path / "chat_train.jsonl", rows * 4)
    write_jsonl(tmp_path / "chat_eval.jsonl", rows[:4])
    write_jsonl(tmp_path / "raw_train.jsonl", [_raw(c) for c in TINY_CHATS] * 4)
    write_jsonl(tmp_path / "raw_eval.jsonl", [_raw(c) for c in TINY_CHATS[:4]])
    write_jsonl(tmp_path / "control.jsonl", rows[4:])
    specs = {
        "forget-chat": _spec(tmp_path, chat_model_dir, "chat", f"train: {tmp_path}/chat_train.jsonl, "
                             f"eval: {tmp_path}/chat_eval.jsonl, format: messages", 1e-2),
        "forget-raw": _spec(tmp_path, chat_model_dir, "raw", f"train: {tmp_path}/raw_train.jsonl, "
                            f"eval: {tmp_path}/raw_eval.jsonl, format: text", 1e-2),
    }
    exp = tmp_path / "runs" / "forget"
    finals = {}
    for trial_id, path in specs.items():
        spec = load_spec(path)
        finals[trial_id] = train.fit(spec, lambda m, c: None, train.RunContext(trial_dir=str(exp / trial_id)))
    chat, raw = finals["forget-chat"], finals["forget-raw"]
    # The raw trial gains more on its own eval set, and pays for it on the control set.
    assert raw.ppl_change < chat.ppl_change
    assert raw.control_change > 0.5, raw
    assert chat.control_change < 0.10, chat
    assert raw.control_base_ppl == pytest.approx(chat.control_base_ppl, rel=1e-6)  # same base, same tokens
    assert raw.base_ppl_unquantized is not None and chat.change_vs_unquantized is not None

    plan = {"name": "forget", "sweep_keys": [], "trials": [{"id": t, "values": {}} for t in specs],
            "select": {"select": "ppl_change", "max_control_increase": 0.10}}
    (exp / "experiment.json").write_text(json.dumps(plan))
    board = results.write_leaderboard(exp, with_plot=False)
    assert board.best.trial_id == "forget-chat"
    md = (exp / "leaderboard.md").read_text()
    assert "`forget-raw`: control perplexity rose" in md

    plan["select"] = {"select": "ppl_change", "max_control_increase": None}
    (exp / "experiment.json").write_text(json.dumps(plan))
    assert results.read_leaderboard(exp).best.trial_id == "forget-raw"  # without the guard it would win
