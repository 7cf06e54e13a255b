"""Read a LoRA GGUF (llama.cpp's adapter format) back into a peft adapter, to measure what it computes.

transformers loads model GGUFs but not adapter GGUFs, so this is the one piece of GGUF
reading written here, on top of the ``gguf`` package: its ``GGUFReader`` and
``quants.dequantize`` read the tensors, and its ``TensorNameMap`` (the table llama.cpp's
converter writes names with) maps each peft module to its GGUF name. The converter also
permutes Llama's Q and K rows for llama.cpp's rotary layout, which reaches ``lora_b`` of
those projections; that is undone here. llama.cpp scales a LoRA by ``alpha / r``, so the
module scale is set to that, whatever peft used (rsLoRA's ``alpha / sqrt(r)`` then shows
as drift, as it would at inference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
import torch

from qlora_ray.errors import UserError

ALPHA_KEY = "adapter.lora.alpha"
# Architectures whose converter permutes attention Q/K rows (LlamaModel.permute in llama.cpp).
PERMUTED = {"llama"}


def _field(reader, key: str):
    field = reader.fields.get(key)
    return field.contents() if field is not None else None


def _unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``: rows (head, 2, d/2) were stored as (head, d/2, 2)."""
    return weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_tensors(path: Path) -> Dict[str, np.ndarray]:
    """Every tensor of a GGUF file, dequantized to float32, in PyTorch's (row-major) shape."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        out[tensor.name] = np.asarray(values, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
    return out


def load_lora_gguf(model, path: Path) -> int:
    """Replace the LoRA weights of the peft ``model`` by those in the LoRA GGUF at ``path``; returns the count.

    Raises :class:`UserError` when the file does not match the model (a module without a
    tensor, a shape that differs).
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch_name = _field(reader, "general.architecture")
    alpha = _field(reader, ALPHA_KEY)
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    if arch is None or alpha is None:
        raise UserError(f"{path}: not a LoRA GGUF of a known architecture (general.architecture={arch_name!r}, "
                        f"{ALPHA_KEY}={alpha!r})")
    config = model.get_base_model().config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tensors = read_tensors(path)
    heads = {"attn_q": config.num_attention_heads,
             "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    count = 0
    for module_name, module in model.named_modules():
        if not (hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})):
            continue
        hf_name = module_name.removeprefix("base_model.model.") + ".weight"
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None or f"{gguf_name}.lora_a" not in tensors:
            raise UserError(f"{path}: no LoRA tensors for {hf_name} (looked for {gguf_name}.lora_a)")
        a, b = tensors[f"{gguf_name}.lora_a"], tensors[f"{gguf_name}.lora_b"]
        kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
        if arch_name in PERMUTED and kind in heads:
            b = _unpermute(b, heads[kind])
        for layer, values in ((module.lora_A["default"], a), (module.lora_B["default"], b)):
            if tuple(layer.weight.shape) != values.shape:
                raise UserError(f"{path}: {gguf_name} has shape {values.shape}, the adapter {tuple(layer.weight.shape)}")
            with torch.no_grad():
                layer.weight.copy_(torch.tensor(values, dtype=layer.weight.dtype))
        module.scaling["default"] = float(alpha) / a.shape[0]
        count += 1
    if count == 0:
        raise UserError("the adapter has no LoRA modules to load")
    return count
