"""``qlora-ray export | push``: a tuned adapter out as a verified GGUF, or onto the Hugging Face Hub.

torch and transformers are imported inside the verbs, as in the other command modules.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import typer

from qlora_ray.cli.app import app, console, err_console, user_errors
from qlora_ray.cli.loading import TRUST_HELP, quiet_libraries, say_base


def _quiet() -> None:
    import transformers

    quiet_libraries()
    transformers.utils.logging.set_verbosity_error()
    for category in (FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module="gguf")


@app.command()
@user_errors
def export(
    target: Path = typer.Argument(..., metavar="RUN_OR_ADAPTER",
                                  help="An adapter, trial or experiment folder (its best trial)."),
    out: Path = typer.Argument(..., metavar="OUT", help="New folder for the GGUF, its Modelfile and the check."),
    fmt: str = typer.Option("gguf", "--format", help="Output format; gguf is the one there is."),
    outtype: str = typer.Option("q8_0", "--outtype", help="GGUF weights: f16 or q8_0 (8-bit blocks, half the size)."),
    adapter_only: bool = typer.Option(False, "--adapter-only", help="Write the adapter alone as a LoRA GGUF "
                                      "(for llama.cpp --lora or an Ollama ADAPTER line), not merged into the base."),
    tolerance: float = typer.Option(0.02, "--tolerance", help="Largest accepted relative drift, either way, of the "
                                    "GGUF's eval perplexity from the model it was converted from: the fp32 merge, "
                                    "or with --adapter-only the adapter on its quantized base (0.02 = 2%)."),
    data_file: Optional[str] = typer.Option(None, "--data", help="Data for the drift check (default: the "
                                            "adapter's eval set)."),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", help="Check on at most this many examples."),
    converter_sdist: Optional[Path] = typer.Option(None, "--converter-sdist", help="A local llama_cpp_python-"
                                                   "0.3.16.tar.gz to take llama.cpp's converter from, instead of "
                                                   "downloading it (first use only; its hash is checked)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Export an adapter as GGUF for llama.cpp and Ollama, kept only if its perplexity holds.

    Merges the adapter into the unquantized base, converts it with llama.cpp's
    convert_hf_to_gguf.py (fetched once into the cache from the llama-cpp-python source
    package, hash checked), re-loads the GGUF through transformers and measures its eval
    perplexity on the same target tokens as the merge it was converted from. When the two
    differ by more than --tolerance (either way) the export is refused with exit status 1 and
    nothing is written: that drift is what the file can be blamed for. The merge's own gap
    from the adapter on its quantized base, which `qlora-ray merge` refuses on, is reported
    beside it but does not refuse an export (the fp32 merge on the unquantized base often
    scores better than the 4-bit base; run `qlora-ray merge` to hold it to --tolerance).
    With --adapter-only the LoRA GGUF is read back into the adapter and compared with it.
    OUT also gets an Ollama Modelfile (chat template, system prompt and stop tokens of the
    model's tokenizer) and export_check.json.

    Examples:
      qlora-ray export runs/hinglish_smoke/hinglish_smoke exports/hinglish-q8 --outtype q8_0
      qlora-ray export runs/hinglish_smoke exports/hinglish-lora --adapter-only --outtype f16
      cd exports/hinglish-q8 && ollama create hinglish -f Modelfile && ollama run hinglish
    """
    from qlora_ray.errors import UserError
    from qlora_ray.export import DriftError, ExportOptions, check_options, export_gguf

    if fmt != "gguf":
        raise UserError(f"--format: '{fmt}' is not supported; the one format is gguf")
    _quiet()
    options = ExportOptions(outtype=outtype, adapter_only=adapter_only, tolerance=tolerance, data_file=data_file,
                            max_examples=max_examples, converter_sdist=converter_sdist,
                            trust_remote_code=trust_remote_code)
    check_options(options, out)
    say_base(target, trust_remote_code)
    try:
        with err_console.status("exporting...") as status:
            check = export_gguf(target, out, options, say=lambda text: status.update(text))
    except DriftError as e:
        _print_check(e.check)
        err_console.print("[bold red]refused:[/]", end=" ")
        err_console.print(str(e), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    _print_check(check)
    console.print(f"[green]exported[/]: {check.gguf}", highlight=False)
    console.print(f"Ollama: cd {out} && ollama create {out.name} -f Modelfile", highlight=False)


def _print_check(check) -> None:
    if check.merged_ppl is not None:
        source = f"merged (fp32) {check.merged_ppl:.4f} (gap from the adapter {check.merge_drift:+.2%}, not checked)"
    else:
        source = "the GGUF read back into the adapter"
    console.print(f"eval perplexity over {check.target_tokens:,} target tokens: adapter (quantized base) "
                  f"{check.adapter_ppl:.4f}, {source}, GGUF {check.kind} {check.outtype} {check.gguf_ppl:.4f}: "
                  f"drift {check.drift:+.2%} from what it was converted from (tolerance {check.tolerance:.2%})",
                  highlight=False)


@app.command()
@user_errors
def push(
    target: Path = typer.Argument(..., metavar="RUN", help="A trial folder, or an experiment folder (its best trial)."),
    repo_id: str = typer.Argument(..., metavar="ORG/NAME", help="The Hub model repository (created if missing)."),
    adapter: bool = typer.Option(False, "--adapter", help="Upload the adapter (peft, safetensors); the default."),
    merged: Optional[Path] = typer.Option(None, "--merged", help="Upload this merged model folder "
                                          "(from `qlora-ray merge`) instead."),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="Upload this export folder "
                                        "(from `qlora-ray export`) instead."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files and print the model card; upload nothing."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Upload a tuned model to the Hugging Face Hub with a model card carrying its leaderboard row.

    The card (README.md) holds base and tuned eval perplexity, the data fingerprint, and the
    resolved spec. The token comes from `hf auth login` or HF_TOKEN, and is never printed.

    Examples:
      qlora-ray push runs/hinglish_smoke/hinglish_smoke me/hinglish-smollm2-lora --dry-run
      qlora-ray push runs/hinglish_sweep me/hinglish-tinyllama-q8 --gguf exports/hinglish-q8
    """
    from qlora_ray.hub import plan_upload, upload

    say_base(target, trust_remote_code)
    plan = plan_upload(target, repo_id, adapter=adapter, merged=merged, gguf=gguf, trust_remote_code=trust_remote_code)
    console.print(f"{'would upload' if dry_run else 'uploading'} to {plan.repo_id} ({plan.kind}):", highlight=False)
    for path, size in plan.listing():
        console.print(f"  {path}  {size:,} bytes", highlight=False, soft_wrap=True)
    if dry_run:
        console.print("\n--- README.md (model card) ---", highlight=False)
        console.print(plan.card, markup=False, highlight=False, soft_wrap=True)
        return
    url = upload(plan, private=private)
    console.print(f"[green]pushed[/]: {url}", highlight=False)
