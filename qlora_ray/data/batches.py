"""Micro-batches for training and evaluation, and packing.

Unpacked batches (``data.packing: false``, and always for evaluation, longest first): examples right-padded
to the longest in the batch with ``pad_token_id``; ``attention_mask`` is the usual 2D
(batch, length) 1/0 padding mask, ``position_ids`` count 0.. along each row, and padding has
label -100.

Packed batches (``data.packing: true``): each epoch the examples are shuffled, then placed in
that order into rows of at most ``max_seq_len`` tokens, best fit (each example goes into the
open row with the least room that still holds it, else opens a row). Examples are never split
(they were truncated to ``max_seq_len`` already), so every target token is trained exactly
once per epoch. Within a row each example attends only to itself:

- ``position_ids`` restart at 0 at each example, so rotary positions match an unpacked run;
- ``attention_mask`` is a 4D boolean block-diagonal causal mask of shape (batch, 1, L, L),
  True where a query token may attend to a key token: same example and not in the future.
  transformers passes a 4D mask to the attention unchanged, and PyTorch SDPA takes boolean
  masks on the CPU and on CUDA without flash-attn (a T4 uses its memory-efficient kernel).
  This needs ``attn_implementation="sdpa"`` (transformers' default): the ``eager`` path adds
  the mask as a float bias and would misread a boolean one. transformers can also derive the
  same mask itself from the position restarts when ``attention_mask`` is left out, but only
  when no KV cache exists; with ``use_cache`` on (the config default, even in train mode) it
  silently falls back to plain causal attention across examples. An explicit mask has no such
  trap, so it is what batches carry (tests check both routes against separate runs);
- the row's tail padding has label -100 and forms its own causal block (so no attention row
  is empty, which would give NaN), and L is the longest row in the batch.

The first token of every example has label -100 (see ``encode.py``), so no loss crosses an
example boundary: the packed row's loss is exactly the sum of its examples' separate losses.

Batches are returned as a lazy sequence: ``len``, indexing, slicing (``batches[k:]`` to resume
after k batches) and iteration work like a list, and each batch's tensors are built only when
it is taken, so a long epoch of (L x L) masks is never all in memory at once.
"""

from __future__ import annotations

import bisect
from functools import partial
from collections.abc import Sequence
from typing import Callable, Dict, List, Union

import numpy as np
import torch

from qlora_ray.data.encode import IGNORE
from qlora_ray.data.records import Example, PreparedData
from qlora_ray.spec import DataSpec

Batch = Dict[str, torch.Tensor]


class Batches(Sequence):
    """A list-like sequence of micro-batches, each collated into tensors when taken."""

    def __init__(self, groups: list, collate: Callable[[list], Batch]):
        self._groups = groups
        self._collate = collate

    def __len__(self) -> int:
        return len(self._groups)

    def __getitem__(self, index: Union[int, slice]) -> Union[Batch, "Batches"]:
        if isinstance(index, slice):
            return Batches(self._groups[index], self._collate)
        return self._collate(self._groups[index])

    def __repr__(self) -> str:
        return f"Batches({len(self)} micro-batches)"


def train_batches(prepared: PreparedData, data: DataSpec, batch_size: int, epoch: int, seed: int) -> Batches:
    """The epoch's micro-batches: shuffled by (seed, epoch), packed when ``data.packing``.

    Deterministic for the same arguments, so a resumed run skips the first k batches.
    """
    pad = _pad_id(prepared)
    if data.packing:
        return Batches(_chunks(packed_rows(prepared, data, epoch, seed), batch_size),
                       partial(collate_packed, pad_id=pad))
    return Batches(_chunks(_shuffled(prepared, epoch, seed), batch_size), partial(collate_padded, pad_id=pad))


def packed_rows(prepared: PreparedData, data: DataSpec, epoch: int, seed: int) -> List[List[Example]]:
    """The epoch's packed rows (lists of examples), before collation."""
    examples = _shuffled(prepared, epoch, seed)
    return [[examples[i] for i in row] for row in pack([len(e.input_ids) for e in examples], data.max_seq_len)]


def eval_batches(prepared: PreparedData, batch_size: int) -> Batches:
    """The eval set unpacked and right-padded (the same tokens for every model), longest examples
    first: neighbours in length share a batch, so padding costs next to nothing. Perplexity is a
    sum over tokens, so the order does not change it; longest first meets a memory limit at once."""
    pad = _pad_id(prepared)
    ordered = sorted(prepared.eval, key=lambda e: -len(e.input_ids))  # stable: ties keep the file's order
    return Batches(_chunks(ordered, batch_size), partial(collate_padded, pad_id=pad))


def pack(lengths: List[int], capacity: int) -> List[List[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``capacity`` tokens, best fit, in order."""
    rows: List[List[int]] = []
    room: List[tuple] = []  # (free tokens, row index), sorted, for rows with space left
    for i, length in enumerate(lengths):
        at = bisect.bisect_left(room, (length, -1))
        if at < len(room):
            free, r = room.pop(at)
            rows[r].append(i)
        else:
            free, r = capacity, len(rows)
            rows.append([i])
        if free - length > 0:
            bisect.insort(room, (free - length, r))
    return rows


def collate_padded(examples: List[Example], pad_id: int) -> Batch:
    """Right-pad examples into one batch with a 2D padding mask."""
    width = max(len(e.input_ids) for e in examples)
    ids, labels = _empty(len(examples), width, pad_id)
    mask = np.zeros((len(examples), width), dtype=np.int64)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n], labels[b, :n], mask[b, :n] = e.input_ids, e.labels, 1
    positions = np.tile(np.arange(width), (len(examples), 1))
    return _tensors(ids, labels, mask, positions)


def collate_packed(rows: List[List[Example]], pad_id: int) -> Batch:
    """Concatenate each row's examples; per-example positions and a block-diagonal causal mask."""
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids, labels = _empty(len(rows), width, pad_id)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    segments = np.zeros((len(rows), width), dtype=np.int64)
    for b, row in enumerate(rows):
        start = 0
        for s, e in enumerate(row):
            end = start + len(e.input_ids)
            ids[b, start:end], labels[b, start:end] = e.input_ids, e.labels
            positions[b, start:end], segments[b, start:end] = np.arange(end - start), s
            start = end
        # Padding is one more block of its own, so every query attends to at least itself.
        positions[b, start:], segments[b, start:] = np.arange(width - start), len(row)
    # Built in numpy: torch's small CPU ops cost milliseconds each, numpy's microseconds.
    same_example = segments[:, :, None] == segments[:, None, :]
    mask = (same_example & np.tri(width, dtype=bool))[:, None]
    return _tensors(ids, labels, mask, positions)


def _empty(rows: int, width: int, pad_id: int) -> tuple:
    return np.full((rows, width), pad_id, dtype=np.int64), np.full((rows, width), IGNORE, dtype=np.int64)


def _tensors(ids: np.ndarray, labels: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> Batch:
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask),
            "position_ids": torch.from_numpy(positions)}


def _shuffled(prepared: PreparedData, epoch: int, seed: int) -> List[Example]:
    order = np.random.default_rng([seed, epoch]).permutation(len(prepared.train))
    return [prepared.train[i] for i in order]


def _chunks(items: list, size: int) -> list:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _pad_id(prepared: PreparedData) -> int:
    if prepared.pad_token_id is None:
        raise ValueError("PreparedData.pad_token_id is unset; build it with qlora_ray.data.prepare")
    return prepared.pad_token_id
