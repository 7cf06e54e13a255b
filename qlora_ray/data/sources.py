"""Data sources: local files and globs, or ``hf://org/name[:split]``, read as numbered raw rows.

Local files are read here rather than through ``datasets.load_dataset("json", ...)``
because that loader fails on the first malformed line, while a bad row must be skipped and
reported by its number. Row numbers are 1-based: the line number in a ``.jsonl`` file (blank
lines keep their number but are not rows), the element index in a ``.json`` array, the data
row (header excluded) in ``.csv`` and ``.parquet``. A glob's files are read in sorted order
and numbered on, so a row number is unique within the source; :func:`locate_row` maps it back
to ``file:number``. Hub datasets go through ``datasets.load_dataset`` (its own cache).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import datasets
import numpy as np

from qlora_ray.errors import UserError

FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
BOM = b"\xef\xbb\xbf"
HF_SCHEME = "hf://"


@dataclass
class RawRow:
    """One row as read: its 1-based number in the source and its value (None: not JSON);
    ``bad`` names a skip reason found while reading (``not_utf8``)."""

    number: int
    value: Any
    bad: Optional[str] = None


@dataclass
class Source:
    """A resolved ``data.train``/``data.eval`` value: the files it names, or a hub dataset."""

    text: str
    key: str  # the spec key that named it, for error messages
    files: List[Path] = field(default_factory=list)
    hf_name: Optional[str] = None
    hf_split: Optional[str] = None
    # A hub dataset is loaded once, when its identity is needed for the cache fingerprint.
    _hf_dataset: Any = field(default=None, repr=False)

    @property
    def is_hf(self) -> bool:
        return self.hf_name is not None


def resolve_source(text: str, key: str) -> Source:
    """Expand a spec's data value into files (checked to exist and be readable types) or a hub id."""
    if text.startswith(HF_SCHEME):
        name, _, split = text[len(HF_SCHEME):].partition(":")
        if not name.strip("/"):
            raise UserError(f"{key}: '{text}' names no dataset; write hf://org/name or hf://org/name:split")
        return Source(text, key, hf_name=name.strip("/"), hf_split=split or "train")
    pattern = os.path.expanduser(text)
    if glob.has_magic(pattern):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"{key}: no file matches '{text}'; check the pattern (relative paths are relative to the spec file)")
    else:
        files = [Path(pattern)]
        if files[0].is_dir():
            raise UserError(f"{key}: '{text}' is a folder; name a file, or a glob such as '{text.rstrip('/')}/*.jsonl'")
        if not files[0].is_file():
            raise UserError(f"{key}: file '{text}' not found; check the path (relative paths are relative to the spec file)")
    for path in files:
        if path.suffix.lower() not in FILE_TYPES:
            raise UserError(f"{path}: unsupported file type '{path.suffix}'; use one of "
                            f"{', '.join(FILE_TYPES)}, or hf://org/name[:split] for a hub dataset")
    return Source(text, key, files=files)


def source_identity(source: Source) -> Dict[str, Any]:
    """What the cache fingerprint needs to know about a source's content.

    Local files are hashed by content (not mtime), so a copied or re-generated identical
    file still hits the cache and an edit within the same second still misses it.
    """
    if source.is_hf:
        dataset = _load_hf(source)
        # The hub dataset's own fingerprint changes with its revision and the split slice.
        return {"hf": source.hf_name, "split": source.hf_split,
                "fingerprint": getattr(dataset, "_fingerprint", None)}
    return {"files": [[str(path.resolve()), _file_hash(path)] for path in source.files]}


def read_rows(source: Source) -> Tuple[List[RawRow], List[Tuple[str, int]]]:
    """All rows of a source, numbered; and (file, rows read) per file for :func:`locate_row`."""
    if source.is_hf:
        dataset = _load_hf(source)
        rows = [RawRow(i + 1, row) for i, row in enumerate(dataset)]
        return rows, [(source.text, len(rows))]
    rows, per_file = [], []
    for path in source.files:
        offset = rows[-1].number if rows else 0
        found = [RawRow(offset + r.number, r.value, r.bad) for r in _read_file(path)]
        per_file.append((str(path), found[-1].number - offset if found else 0))
        rows.extend(found)
    return rows, per_file


def locate_row(number: int, files: List[Tuple[str, int]]) -> str:
    """``file:row`` for a source-wide row number (plain number for one-file sources)."""
    if len(files) <= 1:
        return str(number)
    for name, count in files:
        if number <= count:
            return f"{Path(name).name}:{number}"
        number -= count
    return str(number)


def split_rows(rows: List[RawRow], fraction: float, seed: int) -> Tuple[List[RawRow], List[RawRow]]:
    """Hold out ``fraction`` of the rows for evaluation, chosen by a seeded permutation.

    The split is over raw rows (before parsing or tokenizing), so it does not move when the
    tokenizer or max_seq_len changes, and each side reports its own bad rows. Both sides keep
    file order.
    """
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    held_out = set(np.random.default_rng(seed).permutation(len(rows))[:n_eval].tolist())
    train = [r for i, r in enumerate(rows) if i not in held_out]
    evaluation = [r for i, r in enumerate(rows) if i in held_out]
    return train, evaluation


# ---------------------------------------------------------------- readers

def _read_file(path: Path) -> List[RawRow]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path.read_bytes())
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".csv":
            return _read_csv(path)
        return _read_parquet(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read the file ({e.strerror or e}); check that it exists and is readable") from None


def _read_jsonl(data: bytes) -> List[RawRow]:
    rows = []
    # Editors on Windows start UTF-8 files with a byte order mark; it is not part of row 1.
    for number, line in enumerate(data.removeprefix(BOM).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            # Decoding per line keeps one bad byte from costing more than its own row.
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            rows.append(RawRow(number, None, bad="not_utf8"))
            continue
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        rows.append(RawRow(number, value))
    return rows


def _read_json(path: Path) -> List[RawRow]:
    data = path.read_bytes()
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError):
        # Many ".json" files are really JSON lines; read them as such.
        return _read_jsonl(data)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise UserError(f"{path}: expected a JSON array of rows (or one row per line), got {type(value).__name__}")
    return [RawRow(i + 1, row) for i, row in enumerate(value)]


def _read_csv(path: Path) -> List[RawRow]:
    import pandas as pd

    try:
        # Every cell as a string, and empty cells as "" (not NaN), so columns keep their meaning.
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except (ValueError, pd.errors.ParserError) as e:
        raise UserError(f"{path}: not a readable CSV file: {e}") from None
    return [RawRow(i + 1, row) for i, row in enumerate(frame.to_dict(orient="records"))]


def _not_utf8(path: Path) -> UserError:
    """Where a file stops being UTF-8 (pandas reports offsets within its read buffer)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8-sig")
        where = ""
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        where = f" (byte 0x{data[e.start]:02x} on line {line})"
    return UserError(f"{path}: not UTF-8 text{where}; save it as UTF-8")


def _read_parquet(path: Path) -> List[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pa.ArrowException as e:
        raise UserError(f"{path}: not a readable Parquet file: {e}") from None
    return [RawRow(i + 1, row) for i, row in enumerate(table.to_pylist())]


def _load_hf(source: Source) -> Any:
    if source._hf_dataset is None:
        try:
            source._hf_dataset = datasets.load_dataset(source.hf_name, split=source.hf_split)
        except Exception as e:  # noqa: BLE001 - any failure here is the user's name, split or network
            raise UserError(
                f"{source.key}: cannot load '{source.text}' from the Hugging Face hub "
                f"(dataset '{source.hf_name}', split '{source.hf_split}'): {type(e).__name__}: {e}. "
                "Check the name and split and your network, or download the data and point "
                f"{source.key} at local files.") from None
    return source._hf_dataset


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise UserError(f"{path}: cannot read the file ({e.strerror or e}); check that it exists and is readable") from None
    return digest.hexdigest()
