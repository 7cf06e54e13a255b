"""``qlora-ray train | eval | chat | merge``: one trial without Ray, and what to do with its adapter.

torch and transformers are imported inside the verbs: they take seconds, and other verbs
(validate, results) never need them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from qlora_ray.cli.app import app, console, err_console, say, user_errors
from qlora_ray.cli.loading import TRUST_HELP, quiet_libraries, say_base
from qlora_ray.cli.spec_cmds import split_args
from qlora_ray import layout
from qlora_ray.errors import UserError
from qlora_ray.files import move_aside
from qlora_ray.lock import experiment_lock
from qlora_ray.spec import URI_SCHEMES, load_spec


@app.command()
@user_errors
def train(
    args: List[str] = typer.Argument(..., metavar="SPEC [KEY=VALUE...]",
                                     help="The job spec, then dotted overrides (train.max_steps=20)."),
    trial: Optional[str] = typer.Option(None, "--trial", help="Which trial of a sweep to train (its id, "
                                        "as `qlora-ray validate` lists them). Default: the first."),
    fresh: bool = typer.Option(False, "--fresh", help="Start from step 0: the trial's previous folder is "
                               "moved aside to <output.dir>/<name>.old-<time>/ (never deleted)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train one trial in this process (no Ray) into <output.dir>/<name>/<trial id>/.

    Re-running the same command resumes from the trial's last checkpoint.

    Examples:
      qlora-ray train jobs/hinglish_smoke.yaml
      qlora-ray train jobs/hinglish_sweep.yaml --trial hinglish_sweep-r8_lr1e-4 train.max_steps=20
    """
    specs, overrides = split_args(args)
    if len(specs) != 1:
        raise UserError(f"train takes one spec file, got {len(specs)}: {', '.join(map(str, specs))}")
    spec = load_spec(specs[0], overrides)
    if spec.output.dir.startswith(URI_SCHEMES):
        raise UserError(f"output.dir: '{spec.output.dir}' is a storage URI; `qlora-ray train` writes a local "
                        "folder (override output.dir=runs) or a Hub folder (hf://datasets/...), or run the "
                        "spec with `qlora-ray submit`")
    from qlora_ray.mirror import hub_experiment

    with hub_experiment(spec.output.dir, spec.name, False, say) as staging:
        if staging is not None:  # runs in the local mirror of the Hub folder
            spec = load_spec(specs[0], [*overrides, f"output.dir={staging}"])
        _train_chosen(spec, specs[0], trial, fresh, quiet)


def _train_chosen(spec, spec_file, trial: Optional[str], fresh: bool, quiet: bool) -> None:
    from qlora_ray.plan import expand

    trials = expand(spec)
    chosen = trials[0]
    if trial is not None:
        by_id = {t.id: t for t in trials}
        if trial not in by_id:
            raise UserError(f"--trial: no trial '{trial}' in {spec_file}; its trials: {', '.join(by_id)}")
        chosen = by_id[trial]
    elif len(trials) > 1:
        console.print(f"{spec_file} sweeps {len(trials)} trials; training the first ({chosen.id}). "
                      "Pick another with --trial, or run them all with `qlora-ray submit`.", highlight=False)

    from qlora_ray.model import resolve_source

    quiet_libraries()
    with err_console.status("locating the model (a GGUF model is converted once, about a minute)..."):
        resolve_source(spec.model, spec.data.cache_dir)
    with experiment_lock(spec.experiment_dir, f"qlora-ray train {spec_file}"):
        _train_one(chosen, spec, fresh, quiet)


def _train_one(chosen, spec, fresh: bool, quiet: bool) -> None:
    from qlora_ray import train as training

    trial_dir = Path(spec.experiment_dir) / chosen.id
    if fresh:
        moved = move_aside(trial_dir)
        if moved is not None:
            console.print(f"--fresh: moved the previous trial folder to {moved}", highlight=False)
    elif _finished(trial_dir, chosen.spec):
        console.print(f"trial {chosen.id} is already finished ({trial_dir / layout.RESULT_FILE}); nothing to "
                      "train. Train it again from step 0 with --fresh (the old folder is moved aside), or "
                      "raise train.max_steps to train on from its last checkpoint.", highlight=False)
        return
    resume = None if fresh else training.latest_checkpoint(trial_dir)
    if resume is not None:
        console.print(f"resuming from {resume}", highlight=False)
    console.print(f"trial {chosen.id} -> {trial_dir}", highlight=False)
    run = training.RunContext(trial_dir=str(trial_dir), resume_from=str(resume) if resume else None,
                              progress=not quiet)
    tracker = _tracker(chosen, trial_dir)
    report = (lambda metrics, checkpoint: tracker.log_step(chosen.id, metrics)) if tracker else \
        (lambda metrics, checkpoint: None)
    try:
        result = training.fit(chosen.spec, report, run)
    except training.NonFiniteLossError as e:
        _end_tracking(tracker, chosen.id, trial_dir, "failed")
        raise UserError(f"trial {chosen.id}: {e}") from None
    except BaseException:
        _end_tracking(tracker, chosen.id, trial_dir, "failed")
        raise
    if tracker:
        tracker.log_final(chosen.id, result, Path(result.samples_file) if result.samples_file else None)
    _end_tracking(tracker, chosen.id, trial_dir, "finished")
    console.print(_result_table(chosen.id, result))
    _test_set(chosen, trial_dir, quiet)
    console.print(f"adapter: {result.adapter_dir}", highlight=False)
    if result.samples_file:
        console.print(f"samples: {result.samples_file}", highlight=False)


def _finished(trial_dir: Path, spec) -> bool:
    """The trial folder holds a finished run that this spec would not train further."""
    from qlora_ray.records import TrialResult

    result = TrialResult.read(trial_dir / layout.RESULT_FILE)
    final = result.final if result else None
    return final is not None and not (spec.train.max_steps and spec.train.max_steps > final.step)


def _test_set(chosen, trial_dir: Path, quiet: bool) -> None:
    """The trial on the held-out test set (``data.test``), reported apart; saved as ``<exp>/test.json``."""
    import contextlib

    from qlora_ray import layout
    from qlora_ray.files import write_text
    from qlora_ray.sets import measure_test

    if not chosen.spec.data.test:
        return
    with contextlib.nullcontext() if quiet else err_console.status("measuring the test set..."):
        figures = measure_test(trial_dir, chosen.id, chosen.spec.eval.batch_size)
    write_text(trial_dir.parent / layout.TEST_FILE, figures.to_json() + "\n")
    console.print(f"test set ({figures.data}, held out): base {figures.base_ppl:.2f} -> tuned "
                  f"{figures.tuned_ppl:.2f} ({figures.change:+.1%}) over {figures.target_tokens:,} target tokens",
                  highlight=False)


def _tracker(chosen, trial_dir: Path):
    """The experiment trackers the spec asks for, with the trial's run open (None: none asked)."""
    from qlora_ray.tracking import Tracker, wanted

    if not wanted(chosen.spec.tracking):
        return None
    tracker = Tracker(chosen.spec, trial_dir.parent)
    tracker.start(chosen.id, chosen.spec)
    return tracker


def _end_tracking(tracker, trial_id: str, trial_dir: Path, status: str) -> None:
    """Close the trial's runs; what could not be logged goes to stderr and ``tracking.json``."""
    if tracker is None:
        return
    tracker.end(trial_id, status)
    problems = tracker.errors.get(trial_id)
    if problems:
        from qlora_ray.records import TrackingNote

        err_console.print(f"tracking failed (training went on): {'; '.join(problems)}", markup=False, highlight=False)
        (trial_dir / layout.TRACKING_FILE).write_text(TrackingNote(errors=problems).to_json() + "\n", encoding="utf-8")


def _result_table(trial_id: str, result) -> Table:
    table = Table(title=f"{trial_id}: done")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("steps", f"{result.step}"),
            ("train loss", _fmt(result.train_loss, "{:.4f}")),
            ("base eval ppl", _fmt(result.base_ppl, "{:.2f}")),
            ("tuned eval ppl", _fmt(result.eval_ppl, "{:.2f}")),
            ("ppl change", _fmt(result.ppl_change, "{:+.1%}")),
            ("eval target tokens", f"{result.eval_tokens:,}"),
            ("base eval ppl unquantized", _fmt(getattr(result, "base_ppl_unquantized", None), "{:.2f}")),
            ("change vs unquantized base", _fmt(getattr(result, "change_vs_unquantized", None), "{:+.1%}")),
            ("control base ppl", _fmt(getattr(result, "control_base_ppl", None), "{:.2f}")),
            ("control tuned ppl", _fmt(getattr(result, "control_ppl", None), "{:.2f}")),
            ("control change", _fmt(getattr(result, "control_change", None), "{:+.1%}")),
            ("tokens/s", f"{result.tokens_per_s:,.0f}"),
            ("peak memory GiB", f"{result.peak_mem_gb:.2f}"),
            ("train s", f"{result.train_s:.0f}"),
            ("wall s", f"{result.wall_s:.0f}")]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


# ---------------------------------------------------------------- eval

@app.command("eval")
@user_errors
def eval_(
    target: Path = typer.Argument(..., metavar="ADAPTER_OR_RUN",
                                  help="An adapter folder, a trial folder, or an experiment folder (its best trial)."),
    data_files: List[str] = typer.Option(..., "--data", help="Data to measure on: a .jsonl/.json/.csv/.parquet "
                                         "file or glob, or hf://org/name[:split], in any supported format. "
                                         "Repeat for several sets: one row each."),
    fmt: str = typer.Option("auto", "--format", help="Row format: auto, messages, alpaca, prompt_response, text."),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", help="Use at most this many examples."),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len", help="Truncate examples (default: as trained)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Perplexity of an adapter and of its base model on the same target tokens of any datasets.

    The base model's figures come from the cache when any run measured them on the same tokens.

    Examples:
      qlora-ray eval runs/hinglish_smoke/hinglish_smoke --data data/hinglish/eval.jsonl
      qlora-ray eval runs/hinglish_smoke --data data/hinglish/test.jsonl --data data/control/chat_en.jsonl
    """
    from qlora_ray.adapters import eval_data, evaluate_adapter_on

    quiet_libraries()
    say_base(target, trust_remote_code)
    results = evaluate_adapter_on(
        target, [(lambda spec, f=f: eval_data(spec, f, fmt, max_examples, max_seq_len)) for f in data_files],
        batch_size, status=err_console.status, bar=None if quiet or as_json else _token_bar,
        trust_remote_code=trust_remote_code)
    if as_json:
        payload = [dataclasses.asdict(r) for r in results]
        console.print_json(json.dumps(payload[0] if len(payload) == 1 else payload))
        return
    first = results[0]
    table = Table(title=f"perplexity of {first.adapter} and its base ({first.base_model}, {first.quantization})")
    for name, justify in (("data", "left"), ("examples", "right"), ("target tokens", "right"),
                          ("base ppl", "right"), ("tuned ppl", "right"), ("change", "right")):
        table.add_column(name, justify=justify)
    for name, r in zip(data_files, results):
        table.add_row(name + (f" ({r.skipped} rows skipped)" if r.skipped else ""), f"{r.examples:,}",
                      f"{r.target_tokens:,}", f"{r.base_ppl:.3f}" + (" (cached)" if r.base_cached else ""), f"{r.tuned_ppl:.3f}", f"{r.ppl_change:+.1%}")
    console.print(table)


def _token_bar(total: int, label: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="tok", unit_scale=True, dynamic_ncols=True)


# ---------------------------------------------------------------- chat

@app.command()
@user_errors
def chat(
    target: Path = typer.Argument(..., metavar="ADAPTER", help="An adapter, trial or experiment folder."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer this one message and exit."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message opening the conversation."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest reply, in tokens (decoded with "
                                       "the eval.* settings the adapter was trained with)."),
    base: bool = typer.Option(False, "--base", help="Answer with the base model (adapter switched off)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Talk to a tuned model: a REPL (/reset clears the history, /quit or Ctrl-D leaves), or --prompt once.

    Examples:
      qlora-ray chat runs/hinglish_smoke/hinglish_smoke
      qlora-ray chat runs/hinglish_smoke/hinglish_smoke -p "Weekend pe kya karein?"
    """
    import contextlib

    from qlora_ray.evaluate import chat_reply
    from qlora_ray.model import load_adapter

    quiet_libraries()
    adapter_dir = say_base(target, trust_remote_code)
    with err_console.status("loading the adapter and its base model..."):
        model, tokenizer, dtype, spec = load_adapter(adapter_dir, trust_remote_code=trust_remote_code)
    decoding = dataclasses.replace(spec.eval, max_new_tokens=max_new_tokens)
    opening = [{"role": "system", "content": system}] if system else []

    def answer(messages: list) -> str:
        with model.disable_adapter() if base else contextlib.nullcontext():
            return chat_reply(model, tokenizer, messages, decoding, dtype)

    if prompt is not None:
        console.print(answer(opening + [{"role": "user", "content": prompt}]), markup=False, highlight=False)
        return
    err_console.print(f"chatting with {adapter_dir}{' (base model)' if base else ''}; /reset, /quit", highlight=False)
    history = list(opening)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            err_console.print()
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history = list(opening)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = answer(history)
        history.append({"role": "assistant", "content": reply})
        console.print(f"bot> {reply}", markup=False, highlight=False)


# ---------------------------------------------------------------- merge

@app.command()
@user_errors
def merge(
    target: Path = typer.Argument(..., metavar="ADAPTER", help="An adapter, trial or experiment folder."),
    out: Path = typer.Argument(..., metavar="OUT", help="New folder for the merged model (safetensors)."),
    tolerance: float = typer.Option(0.02, "--tolerance", help="Largest accepted relative drift of the "
                                    "merged model's eval perplexity from the adapter's (0.02 = 2%)."),
    dtype: str = typer.Option("bf16", "--dtype", help="Weights of the merged model: bf16 or fp16."),
    data_file: Optional[str] = typer.Option(None, "--data", help="Data for the drift check "
                                            "(default: the adapter's eval set)."),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", help="Check on at most this many examples."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Merge an adapter into its 16-bit base model and save it, if its perplexity holds.

    The adapter was trained against the quantized base; merged into the 16-bit weights it
    corrects a slightly different model. The merge is refused (nothing written) when the
    merged model's eval perplexity drifts from the adapter's by more than --tolerance.

    Example:
      qlora-ray merge runs/hinglish_smoke/hinglish_smoke merged/hinglish-smollm2
    """
    from qlora_ray.adapters import MergeOptions, merge_adapter

    quiet_libraries()
    say_base(target, trust_remote_code)
    options = MergeOptions(dtype=dtype, tolerance=tolerance, data_file=data_file, max_examples=max_examples,
                           trust_remote_code=trust_remote_code)
    merge_adapter(target, out, options, status=err_console.status,
                  say=lambda text: console.print(text, highlight=False))
    console.print(f"[green]merged[/]: {out}", highlight=False)
