"""What the verbs that load a model or an adapter share (train, eval, chat, merge, export, push):
quiet library logging, naming the base model before it loads, and the --trust-remote-code help.

transformers is imported inside :func:`quiet_libraries`, so importing this module stays cheap.
"""

from __future__ import annotations

from pathlib import Path

from qlora_ray.cli.app import err_console

TRUST_HELP = ("Let the base model's own Python code run (models with custom code). Off whatever the "
              "adapter's spec says: only for a model you trust.")


def quiet_libraries() -> None:
    """Our own progress bar and messages only: no per-file loading bars or deprecation notes."""
    import warnings

    import transformers

    transformers.utils.logging.disable_progress_bar()
    for module in ("transformers", "peft", "bitsandbytes", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=UserWarning, module=module)


def say_base(target: Path, trust_remote_code: bool) -> Path:
    """Name the base model (and revision) about to be loaded for the adapter at ``target``; its folder.
    Refuses (exit 2) an adapter whose spec asks for remote code without --trust-remote-code."""
    from qlora_ray.model import adapter_spec, base_model_label, find_adapter

    adapter_dir = find_adapter(target)
    spec = adapter_spec(adapter_dir, trust_remote_code)
    err_console.print(f"adapter {adapter_dir} on base model {base_model_label(spec)}"
                      + (" (its own code allowed: --trust-remote-code)" if trust_remote_code else ""),
                      highlight=False, markup=False, soft_wrap=True)
    return adapter_dir
