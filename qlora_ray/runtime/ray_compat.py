"""Every touch of Ray's private or unstable surface, in one place. Written for Ray 2.60
(Train V2 the default); each item names what it relies on, so an upgrade checks this file.

- ``ray._private.utils.get_dashboard_dependency_error``: whether ``ray[default]`` (the
  dashboard) is installed;
- logger names inside Ray (``ray._private.authentication...``, the job SDK's, Tune/Train's);
- environment variables Ray reads: ``RAY_AIR_NEW_OUTPUT`` (Tune's reporter),
  ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` and ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`` (Train V2);
- the ``node:__internal_head__`` resource (the head node; named in ``qlora_ray.cluster``);
- Tune's ``Trial.error_file`` / ``Trial.get_error()``;
- ``RayTaskError.cause``;
- the GCS's placement group table (``ray._private.state``, ``gcs_pb2.PlacementGroupTableData``):
  which actor created a placement group and whether it is dead (``ray.util.placement_group_table``
  leaves the creator out);
- Ray Train V2's ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s by default): how long a
  TorchTrainer waits for its worker's resources before a try counts as failed;
- that ``tune.run`` installs its SIGINT handler before it calls the callbacks' ``setup`` (so a
  callback can chain its own in front of it) and that the handler does not raise (``Tuner.fit``
  returns normally after a Ctrl-C).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from ray.tune import Callback

RAY_VERSION = "2.60"

# Settings for the processes of the local Ray we start (its raylet takes this process's
# environment; a value the user set wins). Ray Train's controller looks at its workers every 2 s
# by default, so a finished trial waited up to that long, several times over, before Tune saw it
# end: 0.5 s cut teardown from 4.5-4.7 s to 1.2-2.0 s a trial (benchmarks/RESULTS.md). Ray Train
# also starts a process per trial that watches for preempted cloud nodes: on one machine there is
# nothing to watch, and a dozen trials starting at once would start a dozen more processes.
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Tune's classic reporter honours verbose=0; the new one prints a table per trial regardless.
REPORTER_ENV = {"RAY_AIR_NEW_OUTPUT": "0"}
# What a --detach job's driver runs with (the same reporter; output as it comes).
JOB_ENV = {**REPORTER_ENV, "PYTHONUNBUFFERED": "1"}

_TRIAL_LOGGERS = ("ray.tune", "ray.train", "ray.air")
_AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
_JOB_SDK_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                    "ray._private.runtime_env.packaging")


def dashboard_available() -> bool:
    """Whether the dashboard's dependencies (``ray[default]``) are installed."""
    try:
        from ray._private.utils import get_dashboard_dependency_error
    except ImportError:  # moved in a later Ray: assume ray[default] when aiohttp is there
        import importlib.util

        return importlib.util.find_spec("aiohttp") is not None
    return get_dashboard_dependency_error() is None


@contextlib.contextmanager
def env_defaults(defaults: Dict[str, str]) -> Iterator[None]:
    """``defaults`` in os.environ (where unset) for the block, then restored."""
    added = {k: v for k, v in defaults.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def silence_auth_notice() -> None:
    """Ray logs a token-auth notice at every start; the dashboard line says what to do instead."""
    logging.getLogger(_AUTH_NOTICE_LOGGER).setLevel(logging.ERROR)


def quiet_job_sdk() -> None:
    """The job SDK pins its loggers to INFO ("Uploading package ...", "WebSocket closed ...")."""
    for name in _JOB_SDK_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def quiet_trial_loggers() -> Iterator[None]:
    """Tune and Train log every trial error with a traceback; the table and status.json say it."""
    levels = {n: logging.getLogger(n).level for n in _TRIAL_LOGGERS}
    for name in _TRIAL_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def tune_trial_error(trial: Any) -> str:
    """The text of the error Tune recorded for ``trial`` (its error file), or ''."""
    text = None
    with contextlib.suppress(Exception):
        path = trial.error_file
        if path and os.path.isfile(path):
            text = Path(path).read_text(encoding="utf-8", errors="replace")
    if not text:
        with contextlib.suppress(Exception):
            text = trial.get_error()
    return str(text or "")


def worker_start_timeout_s() -> float:
    """How long Ray Train waits for a trial's worker resources on each try."""
    try:
        return float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60"))
    except ValueError:
        return 60.0


def orphaned_placement_groups() -> List[Any]:
    """Placement groups of this Ray job that an actor created and that outlive it: nothing can
    use them any more, yet Ray frees a non-detached group only when its job ends too.

    A Ray Train controller that dies with its Tune trial (a scheduler stop) leaves its worker
    group's placement group so. Ray Train's own ``PlacementGroupCleaner`` removes it only when
    it can reach the dashboard's state API, which fails without a dashboard and when several
    Ray instances run on the machine ("Found multiple active Ray instances")."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    table = gcs_pb2.PlacementGroupTableData
    job = ray.get_runtime_context().get_job_id()
    found = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        data = table.FromString(raw)
        if (data.state == table.REMOVED or data.is_detached or data.creator_job_id.hex() != job
                or not data.creator_actor_dead or ray.ActorID(data.creator_actor_id).is_nil()):
            continue  # in use, someone else's, or made by the driver itself (Tune's trial groups)
        found.append(PlacementGroup(ray.PlacementGroupID(data.placement_group_id)))
    return found


def task_error_cause(error: BaseException) -> BaseException:
    """The user's exception inside a Ray task error (the error itself when it carries none)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


class InterruptWatch(Callback):
    """A Tune callback that notes when the driver takes a Ctrl-C (SIGINT): ``.at`` is then the
    moment (``records.now()`` format), taken in the signal handler itself, before Tune or the
    trials' own processes (which a terminal's Ctrl-C reaches at the same moment) act on it."""

    def __init__(self) -> None:
        self.at: Optional[str] = None

    @property
    def seen(self) -> bool:
        return self.at is not None

    def setup(self, **info: Any) -> None:
        # Tune installed its handler just before this; ours runs first, then hands over to it.
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers belong to the main thread; Tune installs none there either
        tune_handler = signal.getsignal(signal.SIGINT)

        def note_interrupt(signum: int, frame: Any) -> None:
            if self.at is None:
                from qlora_ray.records import now

                self.at = now()
            if callable(tune_handler):
                tune_handler(signum, frame)
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, note_interrupt)

