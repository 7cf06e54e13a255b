"""The base model's figures (eval perplexity, target tokens, sample replies), measured once.

Every trial, re-run, sweep and ``qlora-ray eval`` that shares the base model, the eval tokens,
the prompts, the decoding settings, the quantization and the device gets the same figures, so
they are stored by a fingerprint of exactly those inputs and never measured twice:

    key = base_key(spec, tokenizer, prepared, device)          # a BaseKey
    figures = cached(key, lambda: measure(...))                # measure runs only on a miss

Layout: ``<data.cache_dir>/base/<fingerprint>.json`` holding the key's fields (to answer "why
did this miss?") and the ``Baseline`` record, written atomically (temp file, rename). A file
lock around the measurement makes a second process that wants the same figures wait for the
first one's instead of measuring again. Batch size is not part of the key: perplexity is a
token-weighted sum over the same tokens whatever the batching.

No Ray here, and no torch at import time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from qlora_ray.files import write_text
from qlora_ray.records import Baseline, SchemaError

log = logging.getLogger(__name__)

# Bump when the same inputs would give different figures (evaluate, loss, model loading).
BASE_CACHE_VERSION = 1
FOLDER = "base"
_HASH_CHUNK = 1 << 20


def _not_identity(default: Any) -> Any:
    """A BaseKey field that says where or how, not what: left out of the fingerprint."""
    return field(default=default, compare=False, metadata={"identity": False})


@dataclass(frozen=True)
class BaseKey:
    """Everything that decides the base model's figures. Every field is part of the fingerprint
    unless its metadata says ``identity: False``; add new fields at the end, with a default that
    keeps the fingerprints of existing keys' meaning (it does change them: a new field means
    figures measured before it are measured again, which is the safe side)."""

    model: str                      # hub id@revision, or the content hash of a local/converted folder
    quantization: str               # mode and double quant, e.g. "nf4+dq"
    compute_dtype: str              # resolved: float32 on the CPU, bfloat16/float16 on GPUs
    device: str                     # cpu or cuda: kernels differ, so do the last digits
    tokenizer: str                  # hash of the tokenizer (vocab, merges, specials) and chat template
    eval_data: str = ""             # hash of the tokenized eval examples; "" when perplexity is off
    prompts: tuple = ()             # the sample prompts, in order
    decoding: str = ""              # max_new_tokens and sampling settings; "" when there are no prompts
    cache_dir: str = _not_identity("~/.cache/qlora-ray")

    def identity(self) -> Dict[str, Any]:
        """The fields the fingerprint is computed from."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("identity", True)}

    def fingerprint(self) -> str:
        """A short hash of :meth:`identity` and the cache version."""
        blob = json.dumps({"version": BASE_CACHE_VERSION, **self.identity()}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]

    @property
    def path(self) -> Path:
        """Where the figures of this key are stored."""
        return Path(os.path.expanduser(self.cache_dir)) / FOLDER / f"{self.fingerprint()}.json"


# ---------------------------------------------------------------- lookup and store

def lookup(key: BaseKey) -> Optional[Baseline]:
    """The stored figures of ``key``, or None (absent, unreadable, or stored for other inputs)."""
    try:
        raw = json.loads(key.path.read_text(encoding="utf-8"))
        if raw.get("key") != json.loads(json.dumps(key.identity(), default=list)):
            return None  # a fingerprint collision or a hand-edited file: never trusted
        return Baseline.from_dict(raw["baseline"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SchemaError):
        return None


def store(key: BaseKey, figures: Baseline) -> Path:
    """Write the figures of ``key`` atomically; returns the file."""
    path = key.path
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"version": BASE_CACHE_VERSION, "key": key.identity(), "baseline": figures.to_dict()}
    write_text(path, json.dumps(body, indent=2, ensure_ascii=False, default=list) + "\n")
    return path


def cached(key: BaseKey, measure: Callable[[], Baseline]) -> Baseline:
    """The base figures for ``key``: from the cache, else ``measure()`` once and stored.

    A process that finds another one measuring the same key waits for it and takes its figures.
    """
    from filelock import FileLock

    hit = lookup(key)
    if hit is not None:
        log.info("base figures from the cache: %s", key.path)
        return hit
    key.path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(key.path) + ".lock"):
        hit = lookup(key)
        if hit is not None:
            return hit
        figures = measure()
        store(key, figures)
    if key.prompts and figures.perplexity is not None:
        # The perplexity alone is what ``qlora-ray eval`` asks for (no prompts): keep it under that key too.
        store(dataclasses.replace(key, prompts=(), decoding=""),
              Baseline(perplexity=figures.perplexity, target_tokens=figures.target_tokens))
    return figures


# ---------------------------------------------------------------- building a key

def base_key(spec, tokenizer, prepared, device, prompts: Optional[Sequence[str]] = None) -> BaseKey:
    """The BaseKey of ``spec``'s base model measured on ``prepared.eval`` (when ``eval.perplexity``)
    and ``prompts`` (default: the spec's prompts file) on ``device``, with ``tokenizer`` (already
    given its pad token, as ``model.load_tokenizer`` returns it)."""
    import torch

    from qlora_ray.evaluate import decoding_settings, read_prompts
    from qlora_ray.model import keeps_dequantized, resolve_dtype

    device = torch.device(device)
    prompts = tuple(read_prompts(spec.eval) if prompts is None else prompts)
    q = spec.quantization
    return BaseKey(
        model=model_identity(spec.model, spec.data.cache_dir),
        # "+kept": dequantized once (model.keeps_dequantized), multiplied by plain matmuls whose
        # last digits may differ from bitsandbytes' fused 4-bit kernels.
        quantization=q.mode + ("+dq" if q.double_quant and q.mode in ("nf4", "fp4") else "")
        + ("+kept" if keeps_dequantized(spec, device) else ""),
        compute_dtype=str(resolve_dtype(q, device)).replace("torch.", ""),
        device=device.type,
        tokenizer=tokenizer_hash(tokenizer),
        eval_data=eval_hash(prepared.eval) if spec.eval.perplexity and prepared.eval else "",
        prompts=prompts,
        decoding=json.dumps(decoding_settings(spec.eval), sort_keys=True) if prompts else "",
        cache_dir=spec.data.cache_dir)


def model_identity(model, cache_dir: str) -> str:
    """``hub:<id>@<revision>`` for a hub model, ``dir:<content hash>`` for a local or converted folder."""
    from qlora_ray.model import resolve_source

    source = resolve_source(model, cache_dir)
    local = Path(source.path)
    if local.is_dir():
        return "dir:" + folder_hash(local, cache_dir)
    return f"hub:{source.path}@{source.revision or 'main'}"


def tokenizer_hash(tokenizer) -> str:
    """A hash of the tokenizer's definition and chat template (prompts are rendered through both)."""
    from qlora_ray.data.cache import tokenizer_identity

    ident = {"tokenizer": tokenizer_identity(tokenizer), "template": getattr(tokenizer, "chat_template", None)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:20]


def eval_hash(examples) -> str:
    """A hash of the tokenized eval examples (token ids and labels, in order): exactly the tokens
    perplexity is measured on, whatever files, template or settings produced them."""
    import numpy as np

    digest = hashlib.sha256()
    for e in examples:
        digest.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        digest.update(b"|")
        digest.update(np.asarray(e.labels, dtype=np.int64).tobytes())
        digest.update(b"#")
    return digest.hexdigest()[:20]


def folder_hash(folder: Path, cache_dir: str) -> str:
    """A content hash of a model folder's files (names and bytes). Each file's hash is remembered
    under ``<cache_dir>/base/files.json`` by path, size and modification time, so a multi-GB
    model is read once, not at every run."""
    memo_path = Path(os.path.expanduser(cache_dir)) / FOLDER / "files.json"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    digest, changed = hashlib.sha256(), False
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p, folder)):
        stat = path.stat()
        entry = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if entry not in memo:
            memo[entry], changed = _file_sha(path), True
        digest.update(f"{path.relative_to(folder).as_posix()}:{memo[entry]}\n".encode("utf-8"))
    if changed:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        write_text(memo_path, json.dumps(memo, indent=0, sort_keys=True))
    return digest.hexdigest()[:20]


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts) or path.suffix == ".lock"


def _file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
