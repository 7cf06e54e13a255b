"""``train.fused``: whether a trial trains through the fused QLoRA layers (``qlora_ray.kernels``).

The fused path changes forwards only, and only while training: :class:`Trainer` switches it on
around its optimizer steps and off before the adapter is saved and the tuned model measured,
so adapters stay standard peft, checkpoints hold the same tensors, and evaluation runs the
model's own forwards. ``auto`` takes the fused path where the kernels support the model and
the settings, else the peft path, and says why.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, ContextManager, Optional, Tuple

import torch

from qlora_ray.spec import JobSpec

log = logging.getLogger(__name__)


def unsupported(spec: JobSpec) -> Optional[str]:
    """Why the spec's settings rule the fused path out, or None when they allow it."""
    if spec.quantization.mode == "int8":
        return "quantization.mode int8: the fused layers read 4-bit (nf4, fp4) or unquantized bases"
    return None


def choose(model, spec: JobSpec, dtype: torch.dtype, say: Callable[[str], None]) -> Callable[[], ContextManager]:
    """A context manager factory: entering it puts ``model`` on the fused path (or does nothing
    when ``train.fused`` is false or, with auto, the model or settings are not supported)."""
    mode = spec.train.fused_mode
    if mode == "false":
        return contextlib.nullcontext
    reason = unsupported(spec) or _probe(model, dtype)
    if reason is None:
        return lambda: _fused(model, dtype)
    if mode == "true":
        from qlora_ray.errors import UserError

        raise UserError(f"train.fused: true, but {reason}; set train.fused: auto or false")
    log.info("train.fused auto: the peft path (%s)", reason)
    say(f"train.fused auto: the peft path ({reason})")
    return contextlib.nullcontext


def _probe(model, dtype: torch.dtype) -> Optional[str]:
    """Patch and unpatch once: the reason the kernels refuse the model, or None."""
    try:
        from qlora_ray.kernels import fuse
    except ImportError as e:  # pragma: no cover - the kernels ship with the package
        return f"the fused kernels are not importable ({e})"
    try:
        fuse(model, compute_dtype=dtype).unfuse()
    except ValueError as e:
        return str(e)
    return None


@contextlib.contextmanager
def _fused(model, dtype: torch.dtype) -> Tuple:
    from qlora_ray.kernels import fuse

    handle = fuse(model, compute_dtype=dtype)
    try:
        yield handle
    finally:
        handle.unfuse()
