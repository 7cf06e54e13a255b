"""What data preparation returns: tokenized examples and per-split statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass
class Example:
    """One tokenized, truncated example; ``labels`` is -100 where no loss is taken."""

    input_ids: List[int]
    labels: List[int]
    row: int  # 1-based row number in its source (see sources.locate_row for globs)


@dataclass
class SplitStats:
    """What happened to one split's rows."""

    rows_read: int
    examples: int
    skipped: Dict[str, int]                    # reason -> rows skipped
    first_skipped_rows: Dict[str, List[int]]   # reason -> first few 1-based row numbers
    target_tokens: int                         # tokens with a label (loss is taken on them)
    total_tokens: int
    lengths: List[int]                         # token length per example
    truncated: int = 0                         # examples cut to max_seq_len
    formats: Dict[str, int] = field(default_factory=dict)        # format -> usable rows (before max_*)
    files: List[Tuple[str, int]] = field(default_factory=list)   # (file, rows it spans)
    left_out: int = 0                          # usable rows dropped by max_*_examples


@dataclass
class PreparedData:
    """Both splits, unpacked (packing happens per epoch in :func:`train_batches`)."""

    train: List[Example]
    eval: List[Example]
    train_stats: SplitStats
    eval_stats: SplitStats
    fingerprint: str
    cache_hit: bool
    cache_path: str = ""
    pad_token_id: Optional[int] = None  # the tokenizer's; what batches are padded with
