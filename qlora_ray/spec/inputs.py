"""The sections that say what is trained: the base model, the data, its quantization, the LoRA adapters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional

from omegaconf import MISSING

from qlora_ray.spec.fields import DATA_FORMATS, DTYPES, QUANT_MODES, Problem, one_of, setting


@dataclass
class ModelSpec:
    name: str = setting(MISSING, "Hub id (org/name), local HF directory, .gguf file, or the offline alias 'smollm2-135m-instruct'.")
    revision: Optional[str] = setting(None, "Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = setting(False, "Allow model code from the hub to run. Off unless you trust the repo.")

    def problems(self) -> Iterator[Problem]:
        if not self.name.strip():
            yield "name", "must not be empty"


@dataclass
class DataSpec:
    train: str = setting(MISSING, "Training data: a local .jsonl/.json/.csv/.parquet file or glob, or hf://org/name[:split].")
    eval: Optional[str] = setting(None, "Held-out data in the same forms; if unset, eval_fraction of train is held out.")
    eval_fraction: float = setting(0.05, "Fraction of train held out for evaluation when eval is unset (fixed seed).")
    format: str = setting("auto", "Row format: auto, messages, alpaca, prompt_response or text.")
    max_seq_len: int = setting(512, "Maximum tokens per training row; longer examples are truncated.")
    packing: bool = setting(True, "Pack several examples per row (attention stays within each example).")
    train_on_prompt: bool = setting(False, "Also train on user/system tokens, not only assistant replies.")
    chat_template: Optional[str] = setting(None, "Jinja chat template overriding the tokenizer's own.")
    max_train_examples: Optional[int] = setting(None, "Use at most this many training examples (after shuffling).")
    max_eval_examples: Optional[int] = setting(None, "Use at most this many eval examples.")
    seed: int = setting(42, "Seed for shuffling and the eval split.")
    cache_dir: str = setting("~/.cache/qlora-ray", "Where tokenized datasets and converted models are cached.")
    test: Optional[str] = setting(None, "Held-out test data in the same forms: measured only for the selected best "
                                        "trial and reported apart (the eval set selects, the test set reports).")
    max_test_examples: Optional[int] = setting(None, "Use at most this many test examples.")

    def problems(self) -> Iterator[Problem]:
        yield from one_of("format", self.format, DATA_FORMATS)
        if self.max_seq_len < 16:
            yield "max_seq_len", f"must be >= 16, got {self.max_seq_len}"
        if not 0.0 <= self.eval_fraction < 1.0:
            yield "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}"
        for key in ("max_train_examples", "max_eval_examples", "max_test_examples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                yield key, f"must be >= 1 when set, got {value}"


@dataclass
class QuantizationSpec:
    mode: str = setting("nf4", "Base weight quantization: nf4, fp4 (4-bit), int8, or none.")
    double_quant: bool = setting(True, "Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: str = setting("auto", "auto (bf16 on sm>=80, fp16 on older GPUs such as T4, fp32 on CPU), bf16, fp16, fp32.")
    cpu_dequantize: bool = setting(True, "On the CPU, dequantize the 4-bit (nf4, fp4) base weights once to the "
                                         "compute dtype and keep them: the same values bitsandbytes dequantizes at "
                                         "every forward (the adapter still learns the 4-bit base); generating "
                                         "replies about 4x cheaper per layer, train steps the same; the base's "
                                         "memory that of an unquantized one. false: dequantize at every forward, "
                                         "as on a GPU (a big model on a small CPU machine). No effect on GPUs, for "
                                         "int8, or with lora.init loftq (it needs the 4-bit layers).")

    def problems(self) -> Iterator[Problem]:
        yield from one_of("mode", self.mode, QUANT_MODES)
        yield from one_of("compute_dtype", self.compute_dtype, DTYPES)


@dataclass
class LoraSpec:
    r: int = setting(16, "LoRA rank.")
    alpha: int = setting(32, "LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora).")
    dropout: float = setting(0.05, "Dropout on the LoRA input, in [0, 1).")
    target_modules: List[str] = setting(["all-linear"], "Modules to adapt: 'all-linear' or a list of module names.")
    rslora: bool = setting(False, "Rank-stabilized scaling alpha / sqrt(r).")
    init: str = setting("default", "LoRA weight initialisation, passed to peft: default (B = 0), gaussian, orthogonal, "
                                   "nora, or loftq (with a 4-bit base: A and B start at the quantization error).")

    def problems(self) -> Iterator[Problem]:
        if self.r < 1:
            yield "r", f"must be >= 1, got {self.r}"
        if self.alpha < 1:
            yield "alpha", f"must be >= 1, got {self.alpha}"
        if not 0.0 <= self.dropout < 1.0:
            yield "dropout", f"must be in [0, 1), got {self.dropout}"
        if not self.target_modules:
            yield "target_modules", "must name at least one module (or 'all-linear')"
        from qlora_ray.lora_init import init_problem

        problem = init_problem(self.init)
        if problem:
            yield "init", problem
