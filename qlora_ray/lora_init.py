"""``lora.init``: how the LoRA weights start, checked against what the installed peft offers.

Supported are the initialisations that leave the base weights as they are, so the base model
measured with the adapter switched off is the true base and the saved adapter applies to the
original model: ``default`` (B = 0), ``gaussian``, ``orthogonal``, ``nora`` and ``loftq``.

``loftq`` with a 4-bit base follows peft's guidance for already-quantized models: the adapter is
added as usual, then ``replace_lora_weights_loftq`` sets A and B from the SVD of the quantization
error (original weights minus their 4-bit version) read lazily from the model's safetensors, so
``base_q + B A`` starts closer to the 16-bit weights. (peft's ``init_lora_weights="loftq"`` needs
the unquantized model and rewrites its weights; it is not used.)

PiSSA, OLoRA and MiCA rewrite the base weights into a residual, and EVA and CorDA need a
data-driven pass before training; qlora-ray refuses them with the reason.
"""

from __future__ import annotations

import functools
import typing
from pathlib import Path
from typing import Optional, Tuple

SUPPORTED = ("default", "gaussian", "orthogonal", "nora", "loftq")
_WHY_NOT = {
    "pissa": "rewrites the base weights into a residual, so the saved adapter no longer applies to the original base",
    "olora": "rewrites the base weights into a residual, so the saved adapter no longer applies to the original base",
    "mica": "rewrites how the base is adapted (B frozen); not supported",
    "eva": "needs a data-driven pass over the training data before training; not supported",
    "corda": "needs a data-driven pass over the training data before training; not supported",
    "astra": "needs a data-driven pass before training; not supported",
}


@functools.lru_cache(maxsize=1)
def peft_inits() -> Tuple[str, ...]:
    """The string initialisations the installed peft's ``LoraConfig.init_lora_weights`` accepts."""
    from peft import LoraConfig

    hint = typing.get_type_hints(LoraConfig)["init_lora_weights"]
    names = []
    for arg in typing.get_args(hint) or ():
        names += [a for a in typing.get_args(arg) if isinstance(a, str)]
    return tuple(names)


def init_problem(init: str) -> Optional[str]:
    """Why ``lora.init`` cannot be used (None when it can)."""
    if init == "default":
        return None
    offered = peft_inits()
    name = "pissa" if init.startswith("pissa_niter_") else init
    if init not in offered and name not in offered:
        return (f"'{init}' is not an initialisation the installed peft offers; qlora-ray supports "
                f"{', '.join(s for s in SUPPORTED if s == 'default' or s in offered)}")
    if name in _WHY_NOT or name not in SUPPORTED:
        return f"'{init}' {_WHY_NOT.get(name, 'is not supported')}; use one of {', '.join(SUPPORTED)}"
    return None


def peft_value(init: str):
    """The ``init_lora_weights`` argument for ``init`` (loftq starts as default and is set after)."""
    return True if init in ("default", "loftq") else init


def apply_after(model, init: str, model_dir: Optional[str]) -> None:
    """Finish an initialisation that needs the adapted model (loftq on a 4-bit base)."""
    if init != "loftq":
        return
    from peft import replace_lora_weights_loftq

    if model_dir is None:  # a hub model: peft finds its safetensors in the hub cache
        replace_lora_weights_loftq(model)
        return
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if len(files) != 1:
        from qlora_ray.errors import UserError

        raise UserError(f"lora.init: loftq reads the 16-bit weights from the model's one safetensors file; "
                        f"found {len(files)} in {model_dir} (use lora.init=default)")
    replace_lora_weights_loftq(model, model_path=str(files[0]))
