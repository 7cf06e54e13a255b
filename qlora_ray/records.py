"""Typed records: one dataclass for every JSON file (or JSON line) qlora-ray writes.

Each record writes itself with ``to_json`` (its fields plus ``schema``, the version of this
layout) and reads itself with ``from_json``, which ignores unknown keys and fills missing ones
with their defaults, so files from an older version still read. A file from a newer schema is
refused rather than misread. Pure Python: no torch, no Ray.

    experiment.json   ExperimentPlan       job.json       JobRecord
    baseline.json     Baseline             <trial>/status.json    TrialStatus
    <trial>/result.json   TrialResult (FinalMetrics + what the runtime saw)
    <trial>/metrics.jsonl StepMetrics, one per line     <trial>/events.jsonl  TrialEvent, one per line
    <merged model>/merge_check.json   MergeCheck      <export>/export_check.json   ExportCheck
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Type, TypeVar

SCHEMA_VERSION = 1
SCHEMA_KEY = "schema"

R = TypeVar("R", bound="Record")


class SchemaError(ValueError):
    """A record that cannot be read: not a JSON object, or written by a newer qlora-ray."""


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): a figure that can be ranked, plotted and formatted."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def now() -> str:
    """A timestamp for records: UTC, ISO 8601, whole seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class TrialState(str, enum.Enum):
    """Where a trial stands; the order is the leaderboard's after the ranking."""

    PENDING = "pending"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"
    PRUNED = "pruned"    # stopped early by the sweep's scheduler (search.scheduler); a re-submit leaves it

    @property
    def ended(self) -> bool:
        return self in (TrialState.FINISHED, TrialState.FAILED, TrialState.PRUNED)

    @property
    def done(self) -> bool:
        """Nothing left to run: a re-submit skips it (``--fresh`` starts it over)."""
        return self in (TrialState.FINISHED, TrialState.PRUNED)

    def __str__(self) -> str:
        return self.value


class Record:
    """``to_dict``/``to_json``/``from_dict``/``from_json`` for the dataclasses below."""

    def to_dict(self) -> Dict[str, Any]:
        """The record as JSON-ready data, with its schema version first."""
        return {SCHEMA_KEY: SCHEMA_VERSION, **self.fields()}

    def fields(self) -> Dict[str, Any]:
        """The record's fields as JSON-ready data (nested records without a schema of their own)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str, ensure_ascii=False)

    @classmethod
    def from_dict(cls: Type[R], raw: Any) -> R:
        if not isinstance(raw, dict):
            raise SchemaError(f"{cls.__name__}: expected a JSON object, got {type(raw).__name__}")
        version = raw.get(SCHEMA_KEY, SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise SchemaError(f"{cls.__name__}: schema {version!r} is newer than this qlora-ray reads "
                              f"({SCHEMA_VERSION}); upgrade qlora-ray")
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: _typed(cls, known[k], v) for k, v in raw.items() if k in known}
        return cls(**values)

    @classmethod
    def from_json(cls: Type[R], text: str) -> R:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SchemaError(f"{cls.__name__}: not JSON ({e})") from None

    @classmethod
    def read(cls: Type[R], path: Path) -> Optional[R]:
        """The record in ``path``, or None when it is missing, half-written or unreadable."""
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SchemaError, TypeError):
            return None

    @classmethod
    def parse(cls: Type[R], text: Optional[str]) -> Optional[R]:
        """Like :meth:`read`, from text (None when there is none or it does not parse)."""
        if not text:
            return None
        try:
            return cls.from_json(text)
        except (SchemaError, TypeError):
            return None


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.fields()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# Fields holding a nested record or an enum, by (record class name, field name).
_NESTED: Dict[tuple, Any] = {}


def _typed(cls: type, f: dataclasses.Field, value: Any) -> Any:
    kind = _NESTED.get((cls.__name__, f.name))
    if kind is None or value is None:
        return value
    if isinstance(kind, list):
        return [kind[0].from_dict(v) for v in value]
    return kind(value) if issubclass(kind, enum.Enum) else kind.from_dict(value)


# ---------------------------------------------------------------- per step and final figures

@dataclass
class StepMetrics(Record):
    """One logged training step (a line of ``metrics.jsonl``, and what is reported to Ray)."""

    step: int
    total_steps: Optional[int] = None
    epoch: Optional[float] = None
    loss: Optional[float] = None
    lr: Optional[float] = None
    tokens_per_s: Optional[float] = None
    peak_mem_gb: Optional[float] = None
    train_s: Optional[float] = None
    tokens: Optional[int] = None
    eval_ppl: Optional[float] = None  # periodic eval perplexity (eval.every_steps), on eval steps only


@dataclass
class FinalMetrics(Record):
    """A finished trial's figures, stored once: ``<trial>/result.json``."""

    step: int
    total_steps: Optional[int] = None
    train_loss: Optional[float] = None
    eval_ppl: Optional[float] = None
    base_ppl: Optional[float] = None
    ppl_change: Optional[float] = None
    eval_tokens: int = 0
    tokens_per_s: Optional[float] = None
    peak_mem_gb: Optional[float] = None
    wall_s: Optional[float] = None
    train_s: Optional[float] = None
    adapter_dir: Optional[str] = None
    samples_file: Optional[str] = None
    gradient_checkpointing: bool = False  # on at the end (``auto`` switches it on after an out-of-memory step)
    epoch: Optional[float] = None
    best_step: Optional[int] = None  # eval.keep best: the periodic eval step whose adapter was kept
    # The control set (``eval.control``): base vs tuned on the same tokens.
    control_base_ppl: Optional[float] = None
    control_ppl: Optional[float] = None
    control_change: Optional[float] = None
    control_tokens: int = 0
    # The base model unquantized on the eval set (``eval.quantization_cost``), and eval_ppl against it.
    base_ppl_unquantized: Optional[float] = None
    change_vs_unquantized: Optional[float] = None


@dataclass
class Timing(Record):
    """Clock readings (epoch seconds) of one run of a trial, for the runtime's overhead split."""

    worker_entered: float
    fit_started: float
    fit_ended: float


@dataclass
class TrialResult(Record):
    """``<trial>/result.json``: the final figures when training finished, else why it ended."""

    final: Optional[FinalMetrics] = None
    error: Optional[str] = None
    timing: Optional[Timing] = None
    stopped: Optional[str] = None  # why training stopped early at a checkpoint (a resume continues it)


@dataclass
class Baseline(Record):
    """The base model measured once per experiment: eval perplexity and replies to the prompts."""

    perplexity: Optional[float]
    target_tokens: int = 0
    replies: List[str] = field(default_factory=list)
    prompts: List[str] = field(default_factory=list)


@dataclass
class TestFigures(Record):
    """``test.json``: the selected best trial measured once on the held-out test set (``data.test``)."""

    trial_id: str
    data: str
    base_ppl: Optional[float] = None
    tuned_ppl: Optional[float] = None
    change: Optional[float] = None
    target_tokens: int = 0
    examples: int = 0


# ---------------------------------------------------------------- the runtime's records

@dataclass
class Overhead(Record):
    """A trial's time outside ``fit`` in its last run: Ray starting the worker, the worker's
    imports and resume, Ray tearing it down (seconds)."""

    worker_start_s: float
    worker_setup_s: float
    teardown_s: float


@dataclass
class TrialStatus(Record):
    """``<trial>/status.json``, written by the runtime's experiment bookkeeping only."""

    trial_id: str = ""
    values: Dict[str, Any] = field(default_factory=dict)
    status: TrialState = TrialState.PENDING
    reason: Optional[str] = None
    submits: int = 0
    started_at: Optional[str] = None
    ended_at: Optional[str] = None
    total_steps: Optional[int] = None
    trial_wall_s: Optional[float] = None
    attempts: Optional[int] = None
    overhead: Optional[Overhead] = None
    pruned_step: Optional[int] = None        # the step the scheduler stopped it at
    pruned_eval_ppl: Optional[float] = None  # and its periodic eval perplexity there


@dataclass
class TrackingNote(Record):
    """``<trial>/tracking.json``: what the experiment trackers could not log (training went on)."""

    errors: List[str] = field(default_factory=list)


@dataclass
class TrialEvent(Record):
    """A line of ``<trial>/events.jsonl``: a worker started (where, resuming from what)."""

    event: str
    time: str
    pid: int
    host: str
    node_id: Optional[str] = None
    cuda_visible_devices: Optional[str] = None
    resume_from: Optional[str] = None


@dataclass
class PlannedTrial(Record):
    id: str
    values: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ExperimentPlan(Record):
    """``experiment.json``: the trials of every submit so far and where Ray ran them."""

    name: str
    spec_file: Optional[str] = None
    sweep_keys: List[str] = field(default_factory=list)
    trials: List[PlannedTrial] = field(default_factory=list)
    created: Optional[str] = None
    updated: Optional[str] = None
    submits: int = 0
    address: Optional[str] = None
    dashboard: Optional[str] = None
    ray_logs: Optional[str] = None
    select: Optional[Dict[str, Any]] = None  # the spec's ``results`` section: how best is chosen


@dataclass
class JobRecord(Record):
    """``job.json``: a ``submit --detach`` Ray Job."""

    job_id: str
    name: str
    address: str
    submitted_at: str
    entrypoint: str
    spec: str
    experiment: str
    working_dir: Optional[str] = None


_NESTED.update({
    ("TrialResult", "final"): FinalMetrics, ("TrialResult", "timing"): Timing,
    ("TrialStatus", "status"): TrialState, ("TrialStatus", "overhead"): Overhead,
    ("ExperimentPlan", "trials"): [PlannedTrial],
})


# ---------------------------------------------------------------- JSON lines

def parse_lines(cls: Type[R], text: str) -> List[R]:
    """The records of a JSON-lines text; torn or foreign lines (a trial writing right now, a
    final row of an older version) are skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            raw = json.loads(line)
            if isinstance(raw, dict) and not raw.get("done"):
                out.append(cls.from_dict(raw))
        except (ValueError, TypeError):
            continue
    return out


def read_lines(cls: Type[R], path: Path) -> List[R]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    return parse_lines(cls, text)


def read_metrics(path: Path) -> List[StepMetrics]:
    """The step rows of a ``metrics.jsonl`` (the one parser of that file)."""
    return read_lines(StepMetrics, path)


def to_line(record: Record) -> str:
    return json.dumps(record.to_dict(), ensure_ascii=False) + "\n"


@dataclass
class MergeCheck(Record):
    """``merge_check.json`` beside a merged model: the perplexity drift it was accepted with."""

    adapter: str
    dtype: str
    adapter_ppl: float
    merged_ppl: float
    drift: float
    tolerance: float
    target_tokens: int


@dataclass
class ExportCheck(Record):
    """``export_check.json`` beside a GGUF: its eval perplexity against the model it was converted
    from (``drift``, held within ``tolerance``), and the merge's own gap from the adapter beside it."""

    adapter: str
    gguf: str
    kind: str                 # "merged" (a whole model) or "lora" (the adapter alone)
    outtype: str              # the GGUF's weights: f16 or q8_0
    adapter_ppl: float        # the adapter on its quantized base (the model that was trained)
    gguf_ppl: float           # what the GGUF computes
    drift: float              # gguf_ppl against what it came from: merged_ppl (merged), adapter_ppl (lora)
    tolerance: float
    target_tokens: int
    merged_ppl: Optional[float] = None    # the fp32 merge the merged GGUF was converted from
    merge_drift: Optional[float] = None   # merged_ppl / adapter_ppl - 1: reported, not a refusal reason
