"""Export a trained adapter as GGUF (llama.cpp, Ollama), kept only if its perplexity holds.

Two forms:

- merged (default): the adapter merged into its unquantized base (peft ``merge_and_unload``,
  as ``qlora-ray merge`` does), converted to one GGUF at ``f16`` or ``q8_0`` by llama.cpp's
  ``convert_hf_to_gguf.py``, then re-loaded through transformers (``gguf_file=``);
- ``adapter_only``: a LoRA GGUF by ``convert_lora_to_gguf.py``, for ``llama-cli --lora`` or an
  Ollama ``ADAPTER`` line over a GGUF of the base; read back with the ``gguf`` package into
  the adapter on its quantized base, at llama.cpp's scale (alpha / r).

The check: the GGUF's eval perplexity is measured on the same target tokens as the model it
was converted from (the fp32 merge, or for a LoRA GGUF the adapter on its quantized base),
and the export is refused when it drifts from it by more than the tolerance, either way: that
drift is what the file can be blamed for. The merge's own gap from the adapter (the one
``qlora-ray merge`` refuses on) is reported beside it, not refused here: the merge is in fp32
and on the unquantized base, often better than the 4-bit base the adapter was measured on.
Everything is built in a hidden temp folder beside ``out`` and renamed into place only after
the check, so a refusal or a crash leaves nothing. The converter itself, and why it is
llama.cpp's, is described in :mod:`qlora_ray.converter`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from qlora_ray import layout
from qlora_ray.adapters import AdapterMeasure, check_data, measure_adapter, merged_model
from qlora_ray.converter import Converter, ensure_converter
from qlora_ray.errors import UserError
from qlora_ray.evaluate import perplexity
from qlora_ray.files import publish_dir, write_text
from qlora_ray.records import ExportCheck
from qlora_ray.spec import JobSpec

OUTTYPES = ("f16", "q8_0")


@dataclass
class ExportOptions:
    """What ``export_gguf`` writes and how strictly it checks it."""

    outtype: str = "q8_0"
    adapter_only: bool = False
    tolerance: float = 0.02
    data_file: Optional[str] = None      # eval data for the check; default: the adapter's eval set
    max_examples: Optional[int] = None
    converter_sdist: Optional[Path] = None
    trust_remote_code: bool = False      # the user's choice: may the base model's own code run


class DriftError(Exception):
    """The GGUF's perplexity drifted past the tolerance; nothing was kept."""

    def __init__(self, message: str, check: ExportCheck):
        super().__init__(message)
        self.check = check


def check_options(options: ExportOptions, out: Path) -> None:
    """Refuse bad options before any model is loaded."""
    if options.outtype not in OUTTYPES:
        raise UserError(f"--outtype: '{options.outtype}' is not one of {', '.join(OUTTYPES)}")
    if not options.tolerance >= 0:
        raise UserError(f"--tolerance: must be >= 0, got {options.tolerance}")
    if options.max_examples is not None and options.max_examples < 1:
        raise UserError(f"--max-examples: must be >= 1, got {options.max_examples}")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"OUT: '{out}' already exists; give a new folder")


def gguf_stem(adapter_dir: Path) -> str:
    """``<trial id>`` for ``<trial>/adapter``, else the adapter folder's name."""
    return adapter_dir.parent.name if adapter_dir.name == layout.ADAPTER_DIR else adapter_dir.name


def export_gguf(target, out, options: ExportOptions, say: Callable[[str], None] = print) -> ExportCheck:
    """Write ``out/`` (GGUF, ``Modelfile``, ``export_check.json``) for the adapter at ``target``.

    Raises :class:`DriftError` when the GGUF's perplexity drifts past ``options.tolerance``
    from the model it was converted from, and :class:`UserError` for bad input or a failed
    conversion; ``out`` is then not created.
    """
    from qlora_ray.model import adapter_spec, find_adapter, pick_device

    out = Path(out)
    check_options(options, out)
    adapter_dir = find_adapter(target)
    spec = adapter_spec(adapter_dir, options.trust_remote_code)
    converter = ensure_converter(spec.data.cache_dir, options.converter_sdist, say)
    device = pick_device(None)
    say("measuring the adapter on its quantized base...")
    measured = measure_adapter(adapter_dir, spec, check_data(spec, options.data_file, options.max_examples),
                               device, options.trust_remote_code)
    kind = "lora" if options.adapter_only else "merged"
    name = f"{gguf_stem(adapter_dir)}{'.lora' if options.adapter_only else ''}.{options.outtype}.gguf"
    with publish_dir(out) as tmp:
        work = tmp / ".work"
        work.mkdir()
        export = _export_lora if options.adapter_only else _export_merged
        check = export(adapter_dir, spec, converter, tmp / name, work, measured, options, say)
        _refuse_drift(check)
        shutil.rmtree(work)
        check.gguf = str(out / name)  # where it lands once the folder is renamed into place
        write_text(tmp / layout.MODELFILE, _modelfile_text(spec, measured.tokenizer, name, kind))
        write_text(tmp / layout.EXPORT_CHECK_FILE, check.to_json() + "\n")
    return check


def _check(adapter_dir, gguf: Path, kind: str, measured: AdapterMeasure, gguf_ppl: float, options: ExportOptions,
           merged_ppl: Optional[float] = None) -> ExportCheck:
    source = merged_ppl if merged_ppl is not None else measured.perplexity
    return ExportCheck(adapter=str(adapter_dir), gguf=str(gguf), kind=kind, outtype=options.outtype,
                       adapter_ppl=measured.perplexity, gguf_ppl=gguf_ppl, drift=gguf_ppl / source - 1.0,
                       tolerance=options.tolerance, target_tokens=measured.target_tokens, merged_ppl=merged_ppl,
                       merge_drift=None if merged_ppl is None else merged_ppl / measured.perplexity - 1.0)


def _export_merged(adapter_dir, spec, converter: Converter, gguf: Path, work: Path, measured: AdapterMeasure,
                   options: ExportOptions, say) -> ExportCheck:
    from transformers import AutoModelForCausalLM

    from qlora_ray.model import pick_device

    device = pick_device(None)
    say("merging into the unquantized base...")
    # fp32: the only rounding between the merge and the file is then the GGUF's own --outtype.
    merged, dtype = merged_model(adapter_dir, spec, "fp32", device)
    merged_ppl, _ = perplexity(merged, measured.batches, dtype)
    merged.config.use_cache = True
    tokenizer = measured.tokenizer
    if spec.data.chat_template:  # trained with the spec's template: the GGUF should carry that one
        tokenizer.chat_template = spec.data.chat_template
    merged.save_pretrained(work / "hf", safe_serialization=True)
    tokenizer.save_pretrained(work / "hf")
    del merged
    say(f"converting to GGUF ({options.outtype})...")
    converter.run("convert_hf_to_gguf.py", [work / "hf", "--outtype", options.outtype, "--outfile", gguf],
                  work / "convert.log")
    _add_rope_base(gguf, work / "hf" / "config.json")
    say("re-loading the GGUF through transformers and measuring it...")
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any failure to read it back is a failed export
        raise UserError(f"the converted GGUF does not load back through transformers: {type(e).__name__}: {e}; "
                        "nothing was written") from None
    gguf_ppl, _ = perplexity(reloaded.to(device), measured.batches, torch.float32)
    return _check(adapter_dir, gguf, "merged", measured, gguf_ppl, options, merged_ppl)


def _export_lora(adapter_dir, spec, converter: Converter, gguf: Path, work: Path, measured: AdapterMeasure,
                 options: ExportOptions, say) -> ExportCheck:
    from qlora_ray.lora_gguf import load_lora_gguf
    from qlora_ray.model import load_adapter, resolve_source

    source = resolve_source(spec.model, spec.data.cache_dir)
    base = ["--base", source.path] if Path(source.path).is_dir() else ["--base-model-id", source.path]
    say(f"converting the adapter to a LoRA GGUF ({options.outtype})...")
    converter.run("convert_lora_to_gguf.py", [adapter_dir, *base, "--outtype", options.outtype, "--outfile", gguf],
                  work / "convert.log")
    say("reading the LoRA GGUF back into the adapter and measuring it...")
    model, _, dtype, _ = load_adapter(adapter_dir, trust_remote_code=options.trust_remote_code)
    load_lora_gguf(model, gguf)
    gguf_ppl, _ = perplexity(model, measured.batches, dtype)
    return _check(adapter_dir, gguf, "lora", measured, gguf_ppl, options)


def _add_rope_base(gguf_file: Path, config_file: Path) -> None:
    """Write the rotary base into the GGUF when the converter left it out.

    The pinned converter reads ``rope_theta`` from ``AutoConfig(...).to_dict()``, which
    transformers 5 files under ``rope_parameters``; the file then gets llama.cpp's default
    base (10,000). For SmolLM2 (base 100,000) that raised eval perplexity by 4.4%, caught
    by the drift check. The key is added with gguf's own metadata copier
    (``gguf_new_metadata``), tensors untouched. Rotary scaling (``rope_type`` other than
    default) is lost the same way, and silently at short contexts: refused.
    """
    import contextlib
    import io

    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    config = json.loads(config_file.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"the model's rotary scaling ({rope.get('rope_type')}) would be dropped by the pinned "
                        "converter under transformers 5 (it reads rope_scaling); not exported")
    theta = rope.get("rope_theta", config.get("rope_theta"))
    reader = gguf.GGUFReader(str(gguf_file))
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    key = gguf.Keys.Rope.FREQ_BASE.format(arch=arch)
    if theta is None or reader.get_field(key) is not None:
        return
    fixed = gguf_file.with_name(f".{gguf_file.name}.rope")
    writer = gguf.GGUFWriter(str(fixed), arch=arch, endianess=reader.endianess)
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        copy_with_new_metadata(reader, writer, {key: MetadataDetails(gguf.GGUFValueType.FLOAT32, float(theta))}, [])
    del reader
    os.replace(fixed, gguf_file)


def _refuse_drift(check: ExportCheck) -> None:
    """Refuse a GGUF whose perplexity drifts past the tolerance, either way, from the model it was
    converted from. The merge's gap from the adapter is not checked here (see the module doc)."""
    if abs(check.drift) <= check.tolerance:
        return
    source = (f"the fp32 merge's {check.merged_ppl:.4f} it was converted from" if check.merged_ppl is not None
              else f"the adapter's {check.adapter_ppl:.4f} it was converted from")
    hint = "an f16 export drifts less than q8_0" if check.outtype == "q8_0" else \
        "the converter or the reader lost something; see the converter's log"
    raise DriftError(f"refusing to export: the GGUF's eval perplexity {check.gguf_ppl:.4f} drifts {check.drift:+.2%} "
                     f"from {source} (--tolerance {check.tolerance:.2%}); nothing written. Hint: {hint}; pass a "
                     "larger --tolerance if this drift is acceptable.", check)


def _modelfile_text(spec: JobSpec, tokenizer, name: str, kind: str) -> str:
    from qlora_ray.modelfile import modelfile

    if kind == "merged":
        return modelfile(f"./{name}", tokenizer, spec.data.chat_template)
    base = spec.model.name
    if base.endswith(".gguf"):
        base = str(Path(base).expanduser().resolve())
    else:
        from qlora_ray.model import OFFLINE_MODELS, _package_file

        if base in OFFLINE_MODELS:
            base = str(_package_file(*OFFLINE_MODELS[base]))
    text = modelfile(base, tokenizer, spec.data.chat_template, adapter=f"./{name}")
    return text.replace(f"FROM {base}", f"# FROM: a GGUF of the base model {spec.model.name}\nFROM {base}", 1)
