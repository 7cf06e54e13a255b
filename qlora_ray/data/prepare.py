"""``prepare``: sources -> rows -> records -> tokenized examples and stats, through the cache."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from qlora_ray.data import cache
from qlora_ray.data.encode import IGNORE, Encoder, truncate
from qlora_ray.data.formats import SKIP_REASONS, BadRow, format_name, normalize
from qlora_ray.data.records import Example, PreparedData, SplitStats
from qlora_ray.data.sources import RawRow, Source, locate_row, read_rows, resolve_source, source_identity, split_rows
from qlora_ray.errors import UserError
from qlora_ray.spec import DataSpec

FIRST_ROWS_KEPT = 5  # row numbers remembered per skip reason


def prepare(data: DataSpec, tokenizer: Any) -> PreparedData:
    """Read, render, tokenize and split the data of a spec, or load it from the cache.

    Bad rows are skipped and counted by reason. Raises :class:`UserError` for a missing or
    unreadable source, rows in no known format, or a split with no usable row.
    """
    train_source = resolve_source(data.train, "data.train")
    eval_source = resolve_source(data.eval, "data.eval") if data.eval else None
    encoder = Encoder(tokenizer, data.chat_template, data.train_on_prompt)
    identities = {"train": source_identity(train_source),
                  "eval": source_identity(eval_source) if eval_source else None}
    key, inputs = cache.fingerprint(data, identities, tokenizer, encoder.template)
    folder = cache.cache_root(data) / key
    cached = cache.load(folder, key)
    if cached is not None:
        return replace(cached, pad_token_id=tokenizer.pad_token_id)

    train_rows, train_files = read_rows(train_source)
    if eval_source is not None:
        eval_rows, eval_files = read_rows(eval_source)
    else:
        _require_room_to_hold_out(train_source, train_rows, data)
        train_rows, eval_rows = split_rows(train_rows, data.eval_fraction, data.seed)
        eval_files = train_files
    # Different seed streams, so capping one split never shifts the other's choice.
    train, train_stats = _build_split(train_rows, train_files, encoder, data, data.max_train_examples, [data.seed, 1])
    evaluation, eval_stats = _build_split(eval_rows, eval_files, encoder, data, data.max_eval_examples, [data.seed, 2])
    _require_usable(train_source, train_stats, "data.train")
    # A named eval set must be usable even when empty: else a run trains, reports no perplexity
    # at all and exits as if it had measured something.
    if eval_rows or eval_source is not None:
        _require_usable(eval_source or train_source, eval_stats,
                        "data.eval" if eval_source else "the data.eval_fraction held out of data.train")

    prepared = PreparedData(train=train, eval=evaluation, train_stats=train_stats, eval_stats=eval_stats,
                            fingerprint=key, cache_hit=False, cache_path=str(folder),
                            pad_token_id=tokenizer.pad_token_id)
    cache.store(folder, prepared, inputs)
    return prepared


def _build_split(rows: List[RawRow], files: List[Tuple[str, int]], encoder: Encoder, data: DataSpec,
                 cap: Optional[int], seed: List[int]) -> Tuple[List[Example], SplitStats]:
    skipped: Counter = Counter()
    first_rows: Dict[str, List[int]] = {}

    def skip(reason: str, row: int) -> None:
        skipped[reason] += 1
        first_rows.setdefault(reason, [])
        if len(first_rows[reason]) < FIRST_ROWS_KEPT:
            first_rows[reason].append(row)

    records, numbers, formats = [], [], Counter()
    for row in rows:
        try:
            if row.bad:
                raise BadRow(row.bad)
            records.append(normalize(row.value, data.format))
        except BadRow as bad:
            skip(bad.reason, row.number)
            continue
        numbers.append(row.number)
        formats[format_name(row.value, data.format)] += 1
    _refuse_unknown_format(rows, skipped, files, data)

    examples, cut = [], []
    for number, encoded in zip(numbers, encoder.encode(records)):
        try:
            if isinstance(encoded, BadRow):
                raise encoded
            example, was_cut = truncate(encoded, data.max_seq_len, number)
        except BadRow as bad:
            skip(bad.reason, number)
            continue
        examples.append(example)
        cut.append(was_cut)

    left_out = 0
    if cap is not None and len(examples) > cap:
        keep = sorted(np.random.default_rng(seed).permutation(len(examples))[:cap].tolist())
        left_out = len(examples) - cap
        examples, cut = [examples[i] for i in keep], [cut[i] for i in keep]
    lengths = [len(e.input_ids) for e in examples]
    stats = SplitStats(
        rows_read=len(rows), examples=len(examples),
        skipped={r: skipped[r] for r in SKIP_REASONS if skipped[r]},
        first_skipped_rows={r: first_rows[r] for r in SKIP_REASONS if r in first_rows},
        target_tokens=sum(sum(1 for t in e.labels if t != IGNORE) for e in examples),
        total_tokens=sum(lengths), lengths=lengths, truncated=sum(cut),
        formats=dict(formats), files=files, left_out=left_out)
    return examples, stats


def _refuse_unknown_format(rows: List[RawRow], skipped: Counter, files: List[Tuple[str, int]],
                           data: DataSpec) -> None:
    """Rows that are JSON objects but none in a known format: the file, not a row, is wrong."""
    objects = [r.value for r in rows if isinstance(r.value, dict)]
    if not objects or skipped["unknown_format"] < len(objects):
        return
    keys = sorted({k for row in objects[:100] for k in row})
    names = ", ".join(name for name, _ in files) or data.train
    raise UserError(
        f"{names}: no row is in a known format; rows have the keys {keys}. Expected 'messages' "
        "(role/content) or ShareGPT 'conversations' (from/value), 'instruction'/'input'/'output' "
        "(alpaca), 'prompt'/'response', or 'text'. Rename the fields, or set data.format.")


def _require_room_to_hold_out(source: Source, rows: List[RawRow], data: DataSpec) -> None:
    if data.eval_fraction > 0 and len(rows) < 2:
        raise UserError(
            f"{source.text}: data.train has {len(rows)} row{'s' if len(rows) != 1 else ''}, too few to hold "
            f"out data.eval_fraction ({data.eval_fraction:g}) for evaluation and still train; give "
            "data.eval (a separate file), more rows, or data.eval_fraction: 0 to train without evaluation.")


def _require_usable(source: Source, stats: SplitStats, what: str) -> None:
    if stats.examples:
        return
    if not stats.rows_read:
        raise UserError(f"{source.text}: {what} is empty (no rows); give it rows, or point {what} at another file.")
    reasons = "; ".join(
        f"{reason} ({SKIP_REASONS[reason]}): {count} (rows "
        f"{', '.join(locate_row(n, stats.files) for n in stats.first_skipped_rows[reason])}"
        f"{', ...' if count > len(stats.first_skipped_rows[reason]) else ''})"
        for reason, count in stats.skipped.items())
    raise UserError(f"{source.text}: no usable rows in {what} ({stats.rows_read} read"
                    f"{'; ' + reasons if reasons else ''}). Fix or remove those rows, or check data.format.")
