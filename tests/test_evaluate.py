"""Perplexity (token-weighted, the same tokens for every model), sample replies, samples.md,
the Baseline record, and the eval / chat / merge commands."""

from __future__ import annotations

import json
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import write_tiny_spec
from qlora_ray import data, evaluate
from qlora_ray import loss as loss_module
from qlora_ray.cli import app
from qlora_ray.model import load_base
from qlora_ray.spec import EvalSpec, load_spec


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """The tiny model unquantized (fp32), its tokenizer, prepared data and the spec."""
    folder = tmp_path_factory.mktemp("evaluate")
    path = write_tiny_spec(folder, tiny_model_dir, tiny_data_dir, quantization="{mode: none, compute_dtype: fp32}",
                           eval=f"{{prompts: {tiny_data_dir}/prompts.txt, max_new_tokens: 5, max_prompts: 1}}")
    spec = load_spec(path)
    model, tokenizer = load_base(spec)[:2]
    return model, tokenizer, data.prepare(spec.data, tokenizer), spec


def test_perplexity_is_token_weighted(loaded):
    model, _, prepared, _ = loaded
    # Reference: each example on its own, summed loss over its target tokens (HF shifts labels).
    total, tokens = 0.0, 0
    with torch.no_grad():
        for example in prepared.eval:
            ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
            logits = model(input_ids=ids).logits
            n = int((labels[:, 1:] != -100).sum())
            total += float(F.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="sum"))
            tokens += n
    expected = math.exp(total / tokens)
    one, n_one = evaluate.perplexity(model, data.eval_batches(prepared, 1))
    four, n_four = evaluate.perplexity(model, data.eval_batches(prepared, 4))
    assert n_one == n_four == tokens == prepared.eval_stats.target_tokens
    assert one == pytest.approx(expected, rel=1e-5) and four == pytest.approx(expected, rel=1e-5)
    # A mean of per-example means would differ: examples have different target counts.
    per_example = []
    for example in prepared.eval:
        ppl, _ = evaluate.perplexity(model, data.eval_batches(
            type(prepared)(**{**prepared.__dict__, "eval": [example]}), 1))
        per_example.append(math.log(ppl))
    assert math.exp(sum(per_example) / len(per_example)) != pytest.approx(expected, rel=1e-4)


def test_perplexity_leaves_the_mode_alone(loaded):
    model, _, prepared, _ = loaded
    model.train()
    evaluate.perplexity(model, data.eval_batches(prepared, 4))
    assert model.training
    model.eval()


def test_generate_replies_is_deterministic_and_batched(loaded):
    model, tokenizer, _, spec = loaded
    prompts = ["Chai kaise banate hain?", "Kal barish hogi?", "Hi"]
    settings = dataclasses.replace(spec.eval, max_new_tokens=5, batch_size=2)
    first = evaluate.generate_replies(model, tokenizer, prompts, settings)
    again = evaluate.generate_replies(model, tokenizer, prompts, settings)
    assert len(first) == 3 and first == again and all(isinstance(r, str) for r in first)
    assert tokenizer.padding_side == "right"  # restored after left-padded generation
    assert evaluate.generate_replies(model, tokenizer, [], settings) == []
    # Sampling is seeded: the same seed draws the same replies, and the settings reach generate.
    sampled = dataclasses.replace(settings, temperature=1.5, top_p=0.9, seed=7, max_new_tokens=8)
    one = evaluate.generate_replies(model, tokenizer, prompts, sampled)
    assert one == evaluate.generate_replies(model, tokenizer, prompts, sampled)
    others = [evaluate.generate_replies(model, tokenizer, prompts, dataclasses.replace(sampled, seed=s))
              for s in (8, 9, 10)]
    assert any(o != one for o in others)


def test_ngram_repeats_counts_the_most_frequent_word_trigram():
    assert evaluate.ngram_repeats("Mirch, kabir, kabir, kabir, kabir, kabir") == 3
    assert evaluate.ngram_repeats("3-4 khaana, 3-4 khaana, 3-4 khaana, 3-4 khaana") == 3
    assert evaluate.ngram_repeats("Bhai Mani, aur bhi, aur bhi, aur bhi") == 2
    assert evaluate.ngram_repeats("Paani ubaalo, chai patti daalo, phir doodh.") == 1
    assert evaluate.ngram_repeats("AUR bhi aur, bhi. aur bhi!") == 2  # case and punctuation do not hide a loop
    assert evaluate.ngram_repeats("do words") == 0 and evaluate.ngram_repeats("") == 0
    assert evaluate.ngram_repeats("a b a b a b", n=2) == 3


def test_decoding_settings_are_validated(tmp_path, tiny_model_dir, tiny_data_dir):
    from qlora_ray.spec import SpecError

    path = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, eval="{temperature: -1, top_p: 0, "
                           "repetition_penalty: 0.5, no_repeat_ngram_size: -2, seed: -1}")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    text = str(caught.value)
    for key in ("eval.temperature", "eval.top_p", "eval.repetition_penalty", "eval.no_repeat_ngram_size",
                "eval.seed"):
        assert key in text


def test_baseline_round_trip_and_measure(loaded):
    model, tokenizer, prepared, spec = loaded
    measured = evaluate.measure(model, tokenizer, prepared, spec)
    assert measured.prompts == ["Chai kaise banate hain?"]  # eval.max_prompts: 1
    assert len(measured.replies) == 1 and measured.target_tokens == prepared.eval_stats.target_tokens
    again = evaluate.Baseline.from_json(measured.to_json())
    assert again == measured
    assert evaluate.baseline(spec).perplexity == pytest.approx(measured.perplexity, rel=1e-6)


def test_write_samples_side_by_side(tmp_path):
    path = evaluate.write_samples(tmp_path / "samples.md", ["Kya haal?", "a|b"],
                                  ["base one\nline two", "x"], ["tuned one", ""],
                                  evaluate.describe_decoding(EvalSpec()))
    text = path.read_text()
    assert text.splitlines()[2].startswith("Decoding: greedy (temperature 0), repetition_penalty 1.2, "
                                           "no_repeat_ngram_size 3, max_new_tokens 96;")
    assert "| # | prompt | base | tuned |" in text
    assert "| 1 | Kya haal? | base one<br>line two | tuned one |" in text
    assert "| 2 | a\\|b | x | (empty) |" in text


# ---------------------------------------------------------------- eval / chat / merge commands

@pytest.fixture(scope="module")
def trial(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """A short NF4 training run: the trial folder the commands act on."""
    from qlora_ray import train

    folder = tmp_path_factory.mktemp("commands")
    path = write_tiny_spec(folder, tiny_model_dir, tiny_data_dir,
                           train="{lr: 3.0e-2, max_steps: 3, batch_size: 4, gradient_checkpointing: false}")
    result = train.fit(load_spec(path), lambda m, c: None,
                       train.RunContext(trial_dir=str(folder / "runs" / "tiny" / "tiny")))
    return folder / "runs" / "tiny" / "tiny", result


def test_eval_command_measures_base_and_tuned_on_the_same_tokens(trial, tiny_data_dir, tmp_path, monkeypatch):
    from qlora_ray import adapters

    folder, result = trial
    runner = CliRunner()
    # Same data as the trial's eval set: the same figures as training reported.
    out = runner.invoke(app, ["eval", str(folder), "--data", str(tiny_data_dir / "eval.jsonl"), "--json"])
    assert out.exit_code == 0, out.output
    figures = json.loads(out.output[out.output.index("{"):])
    assert figures["tuned_ppl"] == pytest.approx(result.eval_ppl, rel=1e-5)
    assert figures["base_ppl"] == pytest.approx(result.base_ppl, rel=1e-5)
    assert figures["target_tokens"] == result.eval_tokens
    assert figures["base_cached"] is True  # the trial measured the base on these very tokens
    # New data: base and tuned in one pass (each batch twice), then the base comes from the cache.
    calls = []
    real = adapters.token_loss
    monkeypatch.setattr(adapters, "token_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    other = tmp_path / "other.jsonl"
    other.write_text((tiny_data_dir / "train.jsonl").read_text().splitlines()[5] + "\n")
    first = runner.invoke(app, ["eval", str(folder), "--data", str(other), "--json"])
    first = json.loads(first.output[first.output.index("{"):])
    assert first["base_cached"] is False and len(calls) == 2
    again = runner.invoke(app, ["eval", str(folder), "--data", str(other), "--json"])
    again = json.loads(again.output[again.output.index("{"):])
    assert again["base_cached"] is True and again["base_ppl"] == first["base_ppl"] and len(calls) == 3
    assert again["tuned_ppl"] == pytest.approx(first["tuned_ppl"], rel=1e-6)
    # Any supported format: plain text rows (all tokens are targets).
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Chai peelo yaar", "Kal milte hain bhai"]))
    out = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["eval", str(folder / "adapter"), "--data", str(text)])
    assert out.exit_code == 0, out.output
    assert "base ppl" in out.output and "tuned ppl" in out.output and "text.jsonl" in out.output


def test_eval_command_one_row_per_data_file(trial, tiny_data_dir, tmp_path):
    folder, result = trial
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Chai peelo yaar", "Kal milte hain bhai"]))
    runner = CliRunner(env={"COLUMNS": "200"})
    args = ["eval", str(folder), "--data", str(tiny_data_dir / "eval.jsonl"), "--data", str(text)]
    out = runner.invoke(app, args + ["--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output[out.output.index("["):])
    assert [r["data"] for r in rows] == [str(tiny_data_dir / "eval.jsonl"), str(text)]
    assert rows[0]["tuned_ppl"] == pytest.approx(result.eval_ppl, rel=1e-5) and rows[1]["examples"] == 2
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    lines = [ln for ln in table.output.splitlines() if "eval.jsonl" in ln or "text.jsonl" in ln]
    assert len(lines) == 2 and f"{rows[1]['tuned_ppl']:.3f}" in lines[1]


def test_eval_command_errors_exit_2(trial, tmp_path):
    runner = CliRunner()
    out = runner.invoke(app, ["eval", str(tmp_path), "--data", "x.jsonl"])
    assert out.exit_code == 2 and "holds no adapter" in out.output
    folder, _ = trial
    out = runner.invoke(app, ["eval", str(folder), "--data", str(tmp_path / "missing.jsonl")])
    assert out.exit_code == 2 and "missing.jsonl" in out.output


def test_chat_command_one_shot_and_repl(trial):
    folder, _ = trial
    runner = CliRunner()
    out = runner.invoke(app, ["chat", str(folder), "--prompt", "Chai kaise banate hain?", "--max-new-tokens", "3"])
    assert out.exit_code == 0, out.output
    repl = runner.invoke(app, ["chat", str(folder), "--max-new-tokens", "3"], input="Hi\n/reset\nKya haal?\n/quit\n")
    assert repl.exit_code == 0, repl.output
    assert repl.output.count("bot> ") == 2


def test_merge_refuses_when_perplexity_drifts(trial, tmp_path):
    folder, _ = trial
    out_dir = tmp_path / "merged"
    runner = CliRunner()
    refused = runner.invoke(app, ["merge", str(folder), str(out_dir), "--tolerance", "0"])
    assert refused.exit_code == 2, refused.output
    assert "refusing to merge" in refused.output and "nothing written" in refused.output
    assert not out_dir.exists()


def test_merge_writes_a_plain_model_within_tolerance(trial, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, _ = trial
    out_dir = tmp_path / "merged"
    done = CliRunner().invoke(app, ["merge", str(folder), str(out_dir), "--tolerance", "0.5", "--dtype", "bf16"])
    assert done.exit_code == 0, done.output
    check = json.loads((out_dir / "merge_check.json").read_text())
    assert abs(check["drift"]) <= 0.5
    merged = AutoModelForCausalLM.from_pretrained(out_dir)
    assert merged.dtype == torch.bfloat16 and not any("lora" in n for n, _ in merged.named_parameters())
    again = CliRunner().invoke(app, ["merge", str(folder), str(out_dir)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_token_loss_head_on_targets_only_matches_full_logits(loaded, monkeypatch):
    """The output head and fp32 cross-entropy run only on target rows, in checkpointed chunks; the
    summed loss and the LoRA gradients equal the plain full-logits computation."""
    from qlora_ray.model import add_lora

    _, tokenizer, prepared, spec = loaded
    model = load_base(spec).model
    model = add_lora(model, spec)
    batch = next(iter(data.train_batches(prepared, spec.data, 4, 0, 0)))

    def full_logits_loss():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits
        mask = batch["labels"][:, 1:] != -100
        return F.cross_entropy(logits[:, :-1][mask].float(), batch["labels"][:, 1:][mask], reduction="sum")

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    torch.manual_seed(0)
    expected = full_logits_loss()
    expected_grads = grads(expected)
    monkeypatch.setattr(loss_module, "CE_CHUNK", 7)  # several chunks, the last one partial
    torch.manual_seed(0)
    loss, count = loss_module.token_loss(model, batch)
    assert count == int((batch["labels"][:, 1:] != -100).sum()) > 7
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    got = grads(loss)
    assert got.keys() == expected_grads.keys() and got
    for name, g in got.items():
        torch.testing.assert_close(g, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
