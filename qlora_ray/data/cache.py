"""The on-disk cache of tokenized data, keyed by a fingerprint of everything that shapes it.

Layout: ``<data.cache_dir>/data/<fingerprint>/`` with ``train.npz`` and ``eval.npz`` (each
example's tokens and labels concatenated, plus offsets: Arrow's list layout, in numpy),
``stats.json`` and ``inputs.json`` (what the fingerprint was computed from, to answer "why
did this miss?"). Plain numpy files rather than ``datasets.save_to_disk``: the examples are
already in memory as int lists, numpy writes and reads them in milliseconds, and it touches
no global HF cache or progress-bar state inside Ray workers.

A cache folder is written under a temporary name and renamed into place, and rename is
atomic, so a concurrent trial sees either no cache or a complete one. When two trials build
the same cache at once, the first rename wins and the other discards its copy.

``data.packing`` is deliberately not part of the fingerprint: the cache holds unpacked
examples and :func:`train_batches` packs them per epoch, so a packing on/off comparison
shares one cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from qlora_ray.data.records import Example, PreparedData, SplitStats
from qlora_ray.spec import DataSpec

# Bump when the same inputs would give different examples or stats (encode, formats, prepare).
CACHE_VERSION = 3


def cache_root(data: DataSpec) -> Path:
    """Where tokenized data caches live: ``<data.cache_dir>/data``."""
    return Path(os.path.expanduser(data.cache_dir)) / "data"


def fingerprint(data: DataSpec, sources: Dict[str, Any], tokenizer: Any,
                template: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """A short hash of everything that changes the tokenized set, and the inputs it hashed."""
    inputs = {
        "version": CACHE_VERSION,
        "sources": sources,
        "tokenizer": tokenizer_identity(tokenizer),
        "chat_template": template,
        "format": data.format,
        "max_seq_len": data.max_seq_len,
        "train_on_prompt": data.train_on_prompt,
        "eval_fraction": None if data.eval else data.eval_fraction,
        "max_train_examples": data.max_train_examples,
        "max_eval_examples": data.max_eval_examples,
        "seed": data.seed,
    }
    blob = json.dumps(inputs, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:20], inputs


def tokenizer_identity(tokenizer: Any) -> Dict[str, Any]:
    """The tokenizer's class, special tokens and a hash of its full definition (vocab, merges, rules)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:  # a slow (Python) tokenizer: its vocabulary is the best identity we have
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "class": type(tokenizer).__name__,
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "definition_sha256": hashlib.sha256(definition.encode("utf-8")).hexdigest(),
    }


def load(folder: Path, fingerprint_: str) -> Optional[PreparedData]:
    """The cached data in ``folder``, or None when it is absent or unreadable."""
    if not folder.is_dir():
        return None
    try:
        stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
        return PreparedData(
            train=_read_examples(folder / "train.npz"), eval=_read_examples(folder / "eval.npz"),
            train_stats=_stats(stats["train"]), eval_stats=_stats(stats["eval"]),
            fingerprint=fingerprint_, cache_hit=True, cache_path=str(folder))
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        return None  # a damaged cache is rebuilt, never trusted


def store(folder: Path, prepared: PreparedData, inputs: Dict[str, Any]) -> None:
    """Write the cache to a temporary folder next to ``folder``, then rename it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _write_examples(tmp / "train.npz", prepared.train)
        _write_examples(tmp / "eval.npz", prepared.eval)
        stats = {"train": asdict(prepared.train_stats), "eval": asdict(prepared.eval_stats)}
        (tmp / "stats.json").write_text(json.dumps(stats), encoding="utf-8")
        (tmp / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True), encoding="utf-8")
        _publish(tmp, folder, prepared.fingerprint)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, folder: Path, fingerprint_: str) -> None:
    try:
        os.rename(tmp, folder)
        return
    except OSError:
        pass
    # The folder exists: another trial published the same data first, or a broken cache
    # (a folder someone edited) is in the way and must go.
    if load(folder, fingerprint_) is None:
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            pass  # a concurrent writer won the race; its copy is complete


def _write_examples(path: Path, examples: List[Example]) -> None:
    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    with path.open("wb") as f:
        np.savez(f, input_ids=_flat(examples, "input_ids"), labels=_flat(examples, "labels"),
                 offsets=offsets, rows=np.array([e.row for e in examples], dtype=np.int64))


def _flat(examples: List[Example], key: str) -> np.ndarray:
    return np.fromiter((t for e in examples for t in getattr(e, key)), dtype=np.int32)


def _read_examples(path: Path) -> List[Example]:
    with np.load(path) as arrays:
        ids, labels, offsets, rows = (arrays[k] for k in ("input_ids", "labels", "offsets", "rows"))
        return [Example(ids[a:b].tolist(), labels[a:b].tolist(), int(row))
                for a, b, row in zip(offsets[:-1], offsets[1:], rows)]


def _stats(raw: Dict[str, Any]) -> SplitStats:
    raw = dict(raw)
    raw["files"] = [tuple(f) for f in raw.get("files", [])]
    return SplitStats(**raw)
