"""What to do with a trained adapter: measure it against its base on any data, merge it into its
16-bit base if its perplexity holds. The policies live here; ``qlora-ray eval`` and ``merge``
bind arguments and render.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, List, Optional

import torch

from qlora_ray import data, layout
from qlora_ray.errors import UserError
from qlora_ray.evaluate import perplexity
from qlora_ray.files import publish_dir, write_text
from qlora_ray.loss import token_loss
from qlora_ray.model import adapter_spec, find_adapter, load_adapter, load_base, lora_folded_in, pick_device
from qlora_ray.records import MergeCheck
from qlora_ray.spec import DATA_FORMATS, DataSpec, JobSpec, QuantizationSpec

# Shows what is going on while a block runs (a spinner on a terminal); a no-op by default.
Status = Callable[[str], ContextManager]
# A progress bar over a known total (tqdm-like: ``update(n)``, ``close()``), made by ``bar(total, label)``.
Bar = Callable[[int, str], Any]


def _quiet_status(text: str) -> ContextManager:
    return contextlib.nullcontext()


def eval_data(spec: JobSpec, data_file: str, fmt: str = "auto", max_examples: Optional[int] = None,
              max_seq_len: Optional[int] = None) -> DataSpec:
    """A DataSpec reading ``data_file`` as the eval split, with the adapter's tokenization settings."""
    if fmt not in DATA_FORMATS:
        raise UserError(f"--format: '{fmt}' is not one of {', '.join(DATA_FORMATS)}")
    if not data_file.startswith("hf://"):
        data_file = os.path.abspath(os.path.expanduser(data_file))
    return DataSpec(train=data_file, eval=data_file, format=fmt, packing=False,
                    max_seq_len=max_seq_len or spec.data.max_seq_len,
                    chat_template=spec.data.chat_template, train_on_prompt=spec.data.train_on_prompt,
                    max_train_examples=1, max_eval_examples=max_examples, seed=spec.data.seed,
                    cache_dir=spec.data.cache_dir)


@dataclass
class AdapterEval:
    """An adapter and its base model measured on the same target tokens."""

    adapter: str
    data: str
    base_model: str
    quantization: str
    examples: int
    skipped: int
    target_tokens: int
    base_ppl: float
    tuned_ppl: float
    ppl_change: float
    base_cached: bool = False  # the base figures came from the base-figure cache


def evaluate_adapter(target, dspec_for: Callable[[JobSpec], DataSpec], batch_size: int = 8,
                     status: Status = _quiet_status, bar: Optional[Bar] = None,
                     trust_remote_code: bool = False) -> AdapterEval:
    """Perplexity of the adapter at ``target`` (an adapter, trial or experiment folder) and of its
    base (adapter switched off) on the data ``dspec_for(adapter's spec)`` names. The base model's
    own code runs only with ``trust_remote_code`` (never as the adapter's spec says).

    The base figures come from the base-figure cache when another run measured them; else base
    and tuned are measured in one pass over the batches (each batch twice, adapter off and on)
    and the base figures are cached. ``bar(total target tokens, label)`` shows the progress."""
    return evaluate_adapter_on(target, [dspec_for], batch_size, status, bar, trust_remote_code)[0]


def evaluate_adapter_on(target, dspec_fors: List[Callable[[JobSpec], DataSpec]], batch_size: int = 8,
                        status: Status = _quiet_status, bar: Optional[Bar] = None,
                        trust_remote_code: bool = False) -> List[AdapterEval]:
    """Like :func:`evaluate_adapter` for several data sets, loading the adapter once: one
    AdapterEval per entry of ``dspec_fors``, in order."""
    adapter_dir = find_adapter(target)
    spec = adapter_spec(adapter_dir, trust_remote_code)
    dspecs = [dspec_for(spec) for dspec_for in dspec_fors]
    with status("loading the adapter and its base model..."):
        model, tokenizer, dtype, spec = load_adapter(adapter_dir, trust_remote_code=trust_remote_code)
    return [_evaluate_one(model, tokenizer, dtype, spec, dspec, batch_size, status, bar or _no_bar, str(adapter_dir))
            for dspec in dspecs]


def _evaluate_one(model, tokenizer, dtype, spec: JobSpec, dspec: DataSpec, batch_size: int, status: Status,
                  bar: Bar, adapter: str) -> AdapterEval:
    from qlora_ray.base_cache import lookup, store
    from qlora_ray.records import Baseline

    with status(f"reading {dspec.eval}..."):
        prepared = data.prepare(dspec, tokenizer)
    key = _base_key(model, tokenizer, prepared, spec)
    known = lookup(key)
    batches = data.eval_batches(prepared, batch_size)
    passes = "tuned" if known else "base and tuned"
    progress = bar(prepared.eval_stats.target_tokens * (1 if known else 2),
                                f"measuring {prepared.eval_stats.examples} examples ({passes})")
    try:
        # Base and tuned interleave per batch (adapter off and on); tuned alone may fold LoRA in.
        with (contextlib.nullcontext() if not known else lora_folded_in(model)):
            tuned_sum, base_sum, tokens = _one_pass(model, batches, dtype, not known, progress.update)
    finally:
        progress.close()
    tuned = math.exp(tuned_sum / tokens) if tokens else float("nan")
    if known:
        base = known.perplexity
    else:
        base = math.exp(base_sum / tokens) if tokens else float("nan")
        store(key, Baseline(perplexity=base, target_tokens=tokens))
    return AdapterEval(adapter=adapter, data=dspec.eval, base_model=spec.model.name,
                       quantization=spec.quantization.mode, examples=prepared.eval_stats.examples,
                       skipped=sum(prepared.eval_stats.skipped.values()), target_tokens=tokens,
                       base_ppl=base, tuned_ppl=tuned, ppl_change=tuned / base - 1.0, base_cached=known is not None)


class _NoBar:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def _no_bar(total: int, label: str) -> _NoBar:
    return _NoBar()


@torch.no_grad()
def _one_pass(model, batches, dtype, with_base: bool, advance: Callable[[int], None]):
    """Summed tuned (and, ``with_base``, base) token loss over ``batches`` and the target count."""
    was_training = model.training
    model.eval()
    tuned = base = 0.0
    tokens = 0
    try:
        for batch in batches:
            loss, count = token_loss(model, batch, dtype)
            tuned, tokens = tuned + float(loss), tokens + count
            advance(count)
            if with_base:
                with model.disable_adapter():
                    base += float(token_loss(model, batch, dtype)[0])
                advance(count)
    finally:
        model.train(was_training)
    return tuned, base, tokens


def _base_key(model, tokenizer, prepared, spec: JobSpec):
    """The base-figure cache key of the adapter's base on ``prepared.eval``, perplexity only."""
    from qlora_ray.base_cache import base_key
    from qlora_ray.model import device_of

    spec = dataclasses.replace(spec, eval=dataclasses.replace(spec.eval, perplexity=True))
    return base_key(spec, tokenizer, prepared, device_of(model), prompts=())


@dataclass(frozen=True)
class MergeOptions:
    """How to merge: the merged weights' dtype, the largest accepted perplexity drift, the check's data."""

    dtype: str = "bf16"
    tolerance: float = 0.02
    data_file: Optional[str] = None
    max_examples: Optional[int] = None
    trust_remote_code: bool = False  # the user's choice: may the base model's own code run

    def check(self, out: Path) -> None:
        if self.dtype not in ("bf16", "fp16"):
            raise UserError(f"--dtype: '{self.dtype}' is not bf16 or fp16")
        if self.tolerance < 0:
            raise UserError(f"--tolerance: must be >= 0, got {self.tolerance}")
        if out.exists() and not (out.is_dir() and not any(out.iterdir())):
            raise UserError(f"OUT: '{out}' already exists; give a new folder")


def check_data(spec: JobSpec, data_file: Optional[str], max_examples: Optional[int]) -> DataSpec:
    """The data a drift check measures on: ``data_file`` read as the adapter was trained to read,
    or else the adapter's own eval set (at most ``max_examples`` examples)."""
    if data_file is not None:
        return eval_data(spec, data_file, "auto", max_examples, None)
    return dataclasses.replace(spec.data, max_eval_examples=max_examples or spec.data.max_eval_examples)


@dataclass
class AdapterMeasure:
    """The adapter's eval perplexity on its quantized base, with the batches it was measured on."""

    batches: Any
    perplexity: float
    target_tokens: int
    tokenizer: Any


def measure_adapter(adapter_dir: Path, spec: JobSpec, dspec: DataSpec, device,
                    trust_remote_code: bool = False) -> AdapterMeasure:
    """Eval perplexity of the adapter on the base it was trained on (the reference of a drift check)."""
    model, tokenizer, dtype, _ = load_adapter(adapter_dir, device=device, trust_remote_code=trust_remote_code)
    try:
        prepared = data.prepare(dspec, tokenizer)
    except UserError as e:
        raise UserError(f"{e}\n(the drift check needs eval data; pass --data FILE)") from None
    batches = data.eval_batches(prepared, spec.eval.batch_size)
    ppl, tokens = perplexity(model, batches, dtype)
    if tokens == 0:
        raise UserError("the eval data has no target tokens to check the drift on; pass --data FILE")
    return AdapterMeasure(batches, ppl, tokens, tokenizer)


def merge_adapter(target, out: Path, options: MergeOptions, status: Status = _quiet_status,
                  say: Callable[[str], None] = lambda text: None) -> MergeCheck:
    """Merge the adapter at ``target`` into its 16-bit base and save it to ``out`` (safetensors),
    unless the merged model's eval perplexity drifts from the adapter's by more than the
    tolerance: the adapter learned to correct the quantized base, not the 16-bit one. Then
    nothing is written and a UserError says so."""
    options.check(out)
    adapter_dir = find_adapter(target)
    spec = adapter_spec(adapter_dir, options.trust_remote_code)
    trained_on = spec.quantization.mode
    device = pick_device(None)
    with status("measuring the adapter on its quantized base..."):
        measured = measure_adapter(adapter_dir, spec, check_data(spec, options.data_file, options.max_examples),
                                   device, options.trust_remote_code)
    adapter_ppl, tokens, tokenizer = measured.perplexity, measured.target_tokens, measured.tokenizer
    with status(f"merging into the {options.dtype} base and measuring it..."):
        merged, merged_dtype = merged_model(adapter_dir, spec, options.dtype, device)
        merged_ppl, _ = perplexity(merged, measured.batches, merged_dtype)
    check = MergeCheck(adapter=str(adapter_dir), dtype=options.dtype, adapter_ppl=adapter_ppl, merged_ppl=merged_ppl,
                       drift=merged_ppl / adapter_ppl - 1.0, tolerance=options.tolerance, target_tokens=tokens)
    say(f"eval perplexity over {tokens:,} target tokens: adapter (on {trained_on} base) {adapter_ppl:.4f}, "
        f"merged ({options.dtype}) {merged_ppl:.4f}, drift {check.drift:+.2%}")
    if not abs(check.drift) <= options.tolerance:
        raise UserError(
            f"refusing to merge: the merged model's eval perplexity {merged_ppl:.4f} drifts {check.drift:+.2%} from "
            f"the adapter's {adapter_ppl:.4f} (--tolerance {options.tolerance:.2%}); nothing written. The adapter "
            "learned to correct the quantized base, not the 16-bit one. Serve the adapter on the quantized "
            "base, or pass a larger --tolerance if this drift is acceptable.")
    merged.config.use_cache = True
    # `out` is new or an empty folder (checked above), so replacing it loses nothing.
    with publish_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_text(tmp / layout.MERGE_CHECK_FILE, check.to_json() + "\n")
    return check


def merged_model(adapter_dir: Path, spec: JobSpec, dtype: str, device):
    """The adapter merged into its base loaded unquantized in ``dtype`` (bf16, fp16 or fp32; peft's
    ``merge_and_unload``), and its compute dtype. ``spec`` is the adapter's; its quantization is replaced."""
    from peft import PeftModel

    spec.quantization = QuantizationSpec(mode="none", double_quant=False, compute_dtype=dtype)
    base = load_base(spec, device=device)
    return PeftModel.from_pretrained(base.model, str(adapter_dir)).merge_and_unload(), base.compute_dtype
