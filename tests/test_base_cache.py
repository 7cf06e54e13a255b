"""The base-figure cache: the same inputs never measure the base model twice; each input that
decides the figures (model, quantization, eval tokens, prompts, decoding, device) measures anew."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from conftest import write_tiny_spec
from qlora_ray import base_cache, data, evaluate
from qlora_ray import train as training
from qlora_ray.base_cache import BaseKey, base_key, cached, lookup
from qlora_ray.model import load_tokenizer
from qlora_ray.records import Baseline
from qlora_ray.spec import load_spec


def key(tmp_path, **changes) -> BaseKey:
    fields = dict(model="dir:abc", quantization="nf4+dq", compute_dtype="float32", device="cpu",
                  tokenizer="tok", eval_data="ev", prompts=("Hi",), decoding='{"max_new_tokens": 4}',
                  cache_dir=str(tmp_path))
    return BaseKey(**{**fields, **changes})


class Counter:
    def __init__(self, ppl: float = 12.5):
        self.calls, self.ppl = 0, ppl

    def __call__(self) -> Baseline:
        self.calls += 1
        return Baseline(perplexity=self.ppl, target_tokens=10, replies=["namaste"], prompts=["Hi"])


def test_same_key_measures_once_and_each_changed_field_measures_again(tmp_path):
    measure = Counter()
    first = cached(key(tmp_path), measure)
    again = cached(key(tmp_path), measure)
    assert measure.calls == 1 and again == first and again.replies == ["namaste"]
    changes = dict(model="dir:other", quantization="nf4", compute_dtype="bfloat16", device="cuda",
                   tokenizer="tok2", eval_data="ev2", prompts=("Hi", "Yo"), decoding='{"max_new_tokens": 5}')
    prints = {key(tmp_path).fingerprint()}
    for name, value in changes.items():
        before = measure.calls
        cached(key(tmp_path, **{name: value}), measure)
        assert measure.calls == before + 1, name
        prints.add(key(tmp_path, **{name: value}).fingerprint())
    assert len(prints) == len(changes) + 1
    # Where the cache lives is not an input of the figures.
    assert key(tmp_path, cache_dir="/elsewhere").fingerprint() == key(tmp_path).fingerprint()


def test_a_damaged_or_foreign_file_is_measured_again_never_trusted(tmp_path):
    measure = Counter()
    k = key(tmp_path)
    cached(k, measure)
    k.path.write_text("{not json", encoding="utf-8")
    assert lookup(k) is None
    cached(k, measure)
    assert measure.calls == 2
    body = json.loads(k.path.read_text())
    body["key"]["model"] = "dir:someone-else"  # a file whose recorded inputs differ from the key
    k.path.write_text(json.dumps(body), encoding="utf-8")
    assert lookup(k) is None
    # A failed measurement stores nothing.
    other = key(tmp_path, model="dir:x")
    with pytest.raises(RuntimeError):
        cached(other, lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert not other.path.exists()
    assert [p.name for p in k.path.parent.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_an_extended_key_keeps_working(tmp_path):
    """Another field (say, which eval set) added at the end is part of the fingerprint."""

    @dataclasses.dataclass(frozen=True)
    class WithSet(BaseKey):
        eval_set: str = "eval"

    base = key(tmp_path)
    a = WithSet(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    b = dataclasses.replace(a, eval_set="control")
    assert a.fingerprint() != b.fingerprint() != base.fingerprint()
    measure = Counter()
    cached(a, measure), cached(b, measure), cached(a, measure)
    assert measure.calls == 2


@pytest.fixture
def spec_parts(tmp_path, tiny_model_dir, tiny_data_dir):
    def build(folder=tmp_path, model_dir=tiny_model_dir, **sections):
        sections.setdefault("eval", f"{{prompts: {tiny_data_dir}/prompts.txt, max_new_tokens: 4}}")
        spec = load_spec(write_tiny_spec(folder, model_dir, tiny_data_dir, **sections))
        tokenizer = load_tokenizer(spec.model, spec.data.cache_dir)
        return spec, tokenizer, data.prepare(spec.data, tokenizer)
    return build


def test_base_key_follows_exactly_the_inputs_that_decide_the_figures(spec_parts, tmp_path, tiny_model_dir,
                                                                     tiny_data_dir):
    def fp(**sections):
        return base_key(*spec_parts(**sections), "cpu").fingerprint()

    reference = fp()
    # Not inputs of the base figures: batch size, training settings, LoRA, a fresh process.
    assert fp(train="{max_steps: 9, batch_size: 2, lr: 1.0e-3}", lora="{r: 8, alpha: 16, dropout: 0.1}") == reference
    assert fp(eval=f"{{prompts: {tiny_data_dir}/prompts.txt, max_new_tokens: 4, batch_size: 1}}") == reference
    # Inputs: quantization, decoding, prompts, eval data, the model's bytes.
    changed = [
        fp(quantization="{mode: none, compute_dtype: fp32}"),
        fp(quantization="{mode: nf4, double_quant: false, compute_dtype: fp32}"),
        fp(quantization="{mode: fp4, compute_dtype: fp32}"),
        # Kept dequantized (the CPU default) or dequantized per forward: other kernels, other last digits.
        fp(quantization="{mode: nf4, compute_dtype: fp32, cpu_dequantize: false}"),
        fp(eval=f"{{prompts: {tiny_data_dir}/prompts.txt, max_new_tokens: 5}}"),
        fp(eval=f"{{prompts: {tiny_data_dir}/prompts.txt, max_new_tokens: 4, max_prompts: 1}}"),
        fp(eval="{max_new_tokens: 4, perplexity: false}"),
    ]
    spec, tok, prepared = spec_parts()
    fewer = dataclasses.replace(prepared, eval=prepared.eval[:-1])
    changed.append(base_key(spec, tok, fewer, "cpu").fingerprint())
    longer = dataclasses.replace(spec, data=dataclasses.replace(spec.data, max_seq_len=24))
    changed.append(base_key(longer, tok, data.prepare(longer.data, tok), "cpu").fingerprint())
    copy = tmp_path / "model_copy"
    shutil.copytree(tiny_model_dir, copy)
    assert fp(model_dir=copy) == reference  # the same bytes elsewhere are the same model
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(config))
    changed.append(fp(model_dir=copy))
    assert reference not in changed and len(set(changed)) == len(changed)


def test_second_baseline_and_second_run_do_not_measure_the_base_again(spec_parts, tmp_path, monkeypatch):
    """The runtime's base-model task (``evaluate.baseline``) and a trial share one measurement."""
    spec, _, _ = spec_parts()
    import qlora_ray.model as model_module

    loads = []
    real_load = model_module.load_base  # evaluate.baseline imports it at call time
    monkeypatch.setattr(model_module, "load_base", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    first = evaluate.baseline(spec)
    second = evaluate.baseline(spec)
    assert len(loads) == 1 and first == second and first.perplexity > 0 and len(first.replies) == 2

    measured = []
    real_measure = training.loop.measure
    monkeypatch.setattr(training.loop, "measure", lambda *a, **k: measured.append(1) or real_measure(*a, **k))
    result = training.fit(spec, lambda m, c: None, training.RunContext(trial_dir=str(tmp_path / "t1")))
    assert len(measured) == 1  # only the tuned model: the base figures came from the task above
    assert result.base_ppl == first.perplexity
    assert json.loads((tmp_path / "t1" / "baseline.json").read_text())["perplexity"] == first.perplexity

    changed = dataclasses.replace(spec, eval=dataclasses.replace(spec.eval, max_new_tokens=3))
    training.fit(changed, lambda m, c: None, training.RunContext(trial_dir=str(tmp_path / "t2")))
    assert len(measured) == 3  # a changed decoding setting: base and tuned measured
    # Two keys, the perplexity-only key they share (what `qlora-ray eval` asks for), the unquantized
    # base's perplexity (eval.quantization_cost), the file hashes.
    assert len(list((tmp_path / "cache" / base_cache.FOLDER).glob("*.json"))) == 5
