"""Training data: read, render with the chat template, tokenize, cache, batch and pack.

    prepared = prepare(spec.data, tokenizer)          # cached by fingerprint; stats per split
    for batch in train_batches(prepared, spec.data, batch_size, epoch, seed): model(**batch)
    for batch in eval_batches(prepared, batch_size): ...

Modules, in the order data flows through them:

- ``sources``: ``data.train``/``data.eval`` -> numbered raw rows (jsonl/json/csv/parquet files
  and globs, ``hf://org/name[:split]``); the seeded ``eval_fraction`` split.
- ``formats``: a row -> a chat or a text (messages, ShareGPT, alpaca, prompt/response, text);
  unusable rows raise ``BadRow(reason)`` and are counted, never crash a run.
- ``encode``: chat template rendering; labels on the assistant's reply and its end-of-turn
  token only (unless ``train_on_prompt``); truncation; ``render_example`` for humans.
- ``cache``: the fingerprint and the atomic on-disk cache of the tokenized set.
- ``prepare``: the pipeline above, returning :class:`PreparedData`.
- ``batches``: epoch shuffling, packing and collation.

Packing (``data.packing``): rows of up to ``max_seq_len`` tokens are filled greedily (best
fit, in the epoch's shuffled order) with whole examples, and each example attends only to
itself: ``position_ids`` restart at 0 per example and ``attention_mask`` is a 4D boolean
block-diagonal causal mask (batch, 1, L, L) for SDPA; tail padding has label -100. A packed
row's loss equals the sum of its examples' separate losses. Details in ``batches``.
"""

from qlora_ray.data.batches import Batches, eval_batches, train_batches
from qlora_ray.data.encode import IGNORE, render_example
from qlora_ray.data.formats import SKIP_REASONS
from qlora_ray.data.prepare import prepare
from qlora_ray.data.records import Example, PreparedData, SplitStats
from qlora_ray.data.sources import locate_row

__all__ = [
    "Batches", "Example", "IGNORE", "PreparedData", "SKIP_REASONS", "SplitStats",
    "eval_batches", "locate_row", "prepare", "render_example", "train_batches",
]
