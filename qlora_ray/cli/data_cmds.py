"""``qlora-ray data``: prepare a spec's data (or load it from the cache) and show what training will see."""

from __future__ import annotations

import os
import re
from typing import List

import typer
from rich.table import Table
from rich.text import Text

from qlora_ray.cli.app import app, console, user_errors
from qlora_ray.cli.spec_cmds import split_args
from qlora_ray.errors import UserError
from qlora_ray.spec import load_spec

HISTOGRAM_BINS = 8
BAR_WIDTH = 40


@app.command()
@user_errors
def data(
    args: List[str] = typer.Argument(..., metavar="SPEC [KEY=VALUE...]",
                                     help="A spec file, then dotted overrides."),
    example: int = typer.Option(0, "--example", "-e", help="Which training example to render (0-based)."),
) -> None:
    """Tokenize a spec's data (or load its cache) and report rows, skips, lengths and one example.

    Trained tokens are shown in green, inside [[ ]].

    Examples:
      qlora-ray data jobs/hinglish_smoke.yaml
      qlora-ray data jobs/hinglish_r16.yaml data.max_seq_len=256 --example 3
    """
    specs, overrides = split_args(args)
    if len(specs) != 1:
        raise UserError(f"give one spec file, got {len(specs)}: {', '.join(map(str, specs))}")
    spec = load_spec(specs[0], overrides)
    # Imported here: torch and transformers take seconds, and other verbs never need them.
    from qlora_ray.data import prepare, render_example
    from qlora_ray.data.batches import packed_rows
    from qlora_ray.model import load_tokenizer

    with console.status("loading the tokenizer and preparing data..."):
        tokenizer = load_tokenizer(spec.model, os.path.expanduser(spec.data.cache_dir))
        prepared = prepare(spec.data, tokenizer)

    console.rule(f"data: {specs[0]}")
    console.print(_splits_table(spec, prepared))
    if prepared.train_stats.skipped or prepared.eval_stats.skipped:
        console.print(_skipped_table(prepared))
    for name, stats in (("train", prepared.train_stats), ("eval", prepared.eval_stats)):
        if stats.lengths:
            console.print(_length_summary(name, stats.lengths, spec.data.max_seq_len))
    if spec.data.packing and prepared.train:
        rows = len(packed_rows(prepared, spec.data, epoch=0, seed=spec.train.seed))
        fill = prepared.train_stats.total_tokens / (rows * spec.data.max_seq_len)
        console.print(f"packing: {prepared.train_stats.examples} examples -> {rows} rows of "
                      f"{spec.data.max_seq_len} tokens ({fill:.0%} filled)")
    verdict = "[green]hit[/]" if prepared.cache_hit else "[yellow]miss[/] (tokenized and saved)"
    console.print(f"cache: {verdict} {prepared.cache_path}", highlight=False)

    if prepared.train:
        shown = prepared.train[min(max(example, 0), len(prepared.train) - 1)]
        console.rule(f"train example (row {shown.row}); trained tokens in green [[ ]]")
        console.print(_marked(render_example(shown, tokenizer)))


def _splits_table(spec, prepared) -> Table:
    table = Table(title=f"{spec.name}: data (fingerprint {prepared.fingerprint})")
    table.add_column("")
    table.add_column("train", justify="right")
    table.add_column("eval", justify="right")
    train, evaluation = prepared.train_stats, prepared.eval_stats
    eval_source = spec.data.eval or f"{spec.data.eval_fraction:g} of train (seed {spec.data.seed})"
    table.add_row("source", _short(spec.data.train), _short(eval_source))
    table.add_row("rows read", f"{train.rows_read:,}", f"{evaluation.rows_read:,}")
    table.add_row("skipped", f"{sum(train.skipped.values()):,}", f"{sum(evaluation.skipped.values()):,}")
    for label, attr in (("examples", "examples"), ("truncated", "truncated"), ("left out (max_*)", "left_out"),
                        ("target tokens", "target_tokens"), ("total tokens", "total_tokens")):
        table.add_row(label, f"{getattr(train, attr):,}", f"{getattr(evaluation, attr):,}")
    table.add_row("formats", *(", ".join(f"{k} {v}" for k, v in s.formats.items()) for s in (train, evaluation)))
    return table


def _skipped_table(prepared) -> Table:
    from qlora_ray.data import SKIP_REASONS, locate_row

    table = Table(title="skipped rows (first row numbers)")
    table.add_column("reason")
    table.add_column("meaning")
    table.add_column("train", justify="right")
    table.add_column("eval", justify="right")
    for reason, meaning in SKIP_REASONS.items():
        cells = []
        for stats in (prepared.train_stats, prepared.eval_stats):
            count = stats.skipped.get(reason, 0)
            rows = [locate_row(n, stats.files) for n in stats.first_skipped_rows.get(reason, [])]
            more = ", ..." if count > len(rows) else ""
            cells.append(f"{count} (row{'s' if len(rows) > 1 else ''} {', '.join(rows)}{more})" if count else "")
        if any(cells):
            table.add_row(reason, meaning, *cells)
    return table


def _length_summary(name: str, lengths: List[int], max_len: int) -> Text:
    ordered = sorted(lengths)
    out = Text(f"{name} token lengths: min {ordered[0]}  median {_quantile(ordered, 0.5)}  "
               f"p90 {_quantile(ordered, 0.9)}  "
               f"max {ordered[-1]}  (max_seq_len {max_len})\n")
    width = max(1, -(-max_len // HISTOGRAM_BINS))
    counts = [0] * HISTOGRAM_BINS
    for n in lengths:
        counts[min((n - 1) // width, HISTOGRAM_BINS - 1)] += 1
    for i, count in enumerate(counts):
        bar = "█" * round(BAR_WIDTH * count / max(counts))
        out.append(f"  {i * width + 1:>5}-{min((i + 1) * width, max_len):<5} ")
        out.append(bar, style="cyan")
        out.append(f" {count}\n")
    return out


def _quantile(ordered: List[int], q: float) -> int:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _marked(rendered: str) -> Text:
    """The rendered example with its [[trained]] runs styled."""
    out = Text()
    for i, part in enumerate(re.split(r"\[\[(.*?)\]\]", rendered, flags=re.DOTALL)):
        out.append(f"[[{part}]]" if i % 2 else part, style="bold green" if i % 2 else "dim")
    return out


def _short(path: str, keep: int = 40) -> str:
    return path if len(path) <= keep else "..." + path[-keep + 3:]
