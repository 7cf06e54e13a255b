"""The runtime: a spec's trial plan as a Ray Tune grid of one-worker Ray Train runs.

``submit`` connects to Ray (an embedded local Ray by default, or ``--address`` for a running
cluster), checks that the cluster can place one trial, computes the base model's perplexity and
replies once (a Ray task, saved as ``<exp>/baseline.json``), then runs every unfinished trial:

    Tuner(trial fn, param_space={"trial_id": grid_search(ids)})
      trial fn (a Tune trial on the head node) -> TorchTrainer(one worker, FailureConfig)
        worker loop -> train.fit(spec, report, RunContext(trial_dir, resume_from, baseline))

Layout of an experiment (``<output.dir>/<name>``, a path or a storage URI):

    experiment.json, spec.yaml     the plan and the resolved spec (a changed spec is refused)
    baseline.json                  base-model perplexity and replies, computed once
    <trial id>/                    status.json (written here) + what train.fit writes
    _ray/<name>/                   Tune's experiment state
    _ray/train/<trial id>/         Ray Train run state and checkpoints (resume from here)
    leaderboard.*, best            results.write_leaderboard

Resuming is ours, not Tune's: a re-submit skips trials whose ``status.json`` says finished and
runs the rest under the same Train run names, so Ray Train restores each from its last reported
checkpoint (``ray.train.get_checkpoint()``). ``--fresh`` moves the old folder aside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional

# Tune's classic reporter honours verbose=0; the new one prints a table per trial regardless.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import pyarrow.fs as pafs  # noqa: E402  (a ray[train] dependency)
import ray  # noqa: E402
import ray.train  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.integration.ray_train import TuneReportCallback  # noqa: E402

from qlora_ray import results  # noqa: E402
from qlora_ray.cluster import LOOPBACK, is_loopback, loopback_node_ip, prepare_auth_env  # noqa: E402
from qlora_ray.errors import UserError  # noqa: E402
from qlora_ray.plan import Trial, expand  # noqa: E402
from qlora_ray.spec import URI_SCHEMES, JobSpec, ResourcesSpec, load_spec, project_root, to_yaml  # noqa: E402

if TYPE_CHECKING:  # the driver never imports torch; trials import evaluate themselves
    from qlora_ray import evaluate

log = logging.getLogger(__name__)

RAY_DIR = "_ray"
SPEC_FILE = "spec.yaml"
JOB_FILE = "job.json"
EVENTS_FILE = "events.jsonl"
# fit's final report says done=True; Tune reserves "done", so it travels under this name.
FINAL_KEY = "final"
RESULT_FILE = "result.json"
# Test hook: the worker SIGKILLs itself at this step on its first attempt (a marker file keeps
# the retry alive). Read by the driver and passed to workers, so it works on any cluster.
FAULT_ENV = "QLORA_RAY_TEST_KILL_AT_STEP"
# Test hook: the Tune trial function of this trial id raises after stamping it running (a trial
# driver that crashes, which Tune marks ERROR). Read by the driver, like FAULT_ENV.
DRIVER_FAULT_ENV = "QLORA_RAY_TEST_CRASH_TRIAL"
# The interpreter a --detach job runs on a remote cluster (default: `python` on the head's PATH).
JOB_PYTHON_ENV = "QLORA_RAY_JOB_PYTHON"
# Keys of the spec that may change between submissions of one experiment.
_MUTABLE_KEYS = ("sweep", "resources", "output")
# The Tune trial function only drives a Train run; it holds no CPU (Tune refuses an empty
# request, so it asks for a sliver of the head node: drivers belong on the stable node).
_DRIVER_RESOURCES = {"cpu": 0, "node:__internal_head__": 0.001}


@dataclass(frozen=True)
class TrialSession:
    """Where a trial's last checkpoint comes from and where its reports go."""

    get_checkpoint: Callable[[], Optional[ray.train.Checkpoint]]
    report: Callable[..., None]


TRAIN_SESSION = TrialSession(ray.train.get_checkpoint, ray.train.report)  # runner train: the Train worker
TUNE_SESSION = TrialSession(tune.get_checkpoint, tune.report)             # runner tune: the Tune trial


def trial_resources(res: ResourcesSpec) -> Dict[str, float]:
    """What a Tune trial asks for: a sliver of the head node when it only drives a TorchTrainer
    (runner train), the whole trial's CPUs, GPUs and accelerator type when it trains (runner tune)."""
    if res.runner == "train":
        return dict(_DRIVER_RESOURCES)
    out = {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial}
    if res.accelerator_type:
        out[f"accelerator_type:{res.accelerator_type}"] = 0.001
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _is_uri(text: str) -> bool:
    return text.startswith(URI_SCHEMES)


# ---------------------------------------------------------------- storage

class Storage:
    """An experiment folder as a local path or a URI Ray accepts (s3://, gs://, file://, ...).

    Everything the driver, the trial functions and the workers write goes through here, so a
    trial on another node writes where the driver reads (given shared storage: a URI, or a
    filesystem mounted at the same path on every node).
    """

    def __init__(self, root: str):
        self.root = root.rstrip("/") if _is_uri(root) else str(Path(root).resolve())
        if _is_uri(self.root):
            self.fs, self._path = pafs.FileSystem.from_uri(self.root)
            self.local: Optional[Path] = Path(self._path) if isinstance(self.fs, pafs.LocalFileSystem) else None
        else:
            self.fs, self._path = pafs.LocalFileSystem(), str(Path(self.root).resolve())
            self.local = Path(self._path)

    @property
    def is_local_path(self) -> bool:
        """A plain path here (not a URI): trials write straight into it."""
        return not _is_uri(self.root)

    def path(self, rel: str = "") -> str:
        return f"{self._path}/{rel}".rstrip("/") if rel else self._path

    def uri(self, rel: str = "") -> str:
        """What Ray's ``storage_path`` gets for ``rel``."""
        return f"{self.root}/{rel}".rstrip("/") if rel else self.root

    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_text(self, rel: str) -> Optional[str]:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read().decode("utf-8")
        except (FileNotFoundError, OSError):
            return None

    def read_json(self, rel: str) -> Optional[Dict[str, Any]]:
        text = self.read_text(rel)
        try:
            data = json.loads(text) if text else None
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def write_text(self, rel: str, text: str) -> None:
        parent = self.path(rel).rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if self.local is not None:  # atomic on a filesystem: readers of a running sweep see whole files
            tmp = f"{parent}/.{rel.rsplit('/', 1)[-1]}.{os.getpid()}.tmp"
            with self.fs.open_output_stream(tmp) as f:
                f.write(text.encode("utf-8"))
            self.fs.move(tmp, self.path(rel))
            return
        with self.fs.open_output_stream(self.path(rel)) as f:
            f.write(text.encode("utf-8"))

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_file(self.path(rel))

    def write_json(self, rel: str, data: Dict[str, Any]) -> None:
        self.write_text(rel, json.dumps(data, indent=2, default=str) + "\n")

    def upload(self, local_dir: Path, rel: str, skip: tuple = ("checkpoints",)) -> None:
        """Copy a local folder's files to ``rel`` (used when storage is a URI). The trial's own
        checkpoints stay behind: Ray Train already keeps the ones that resume it in storage."""
        for path in sorted(local_dir.rglob("*")):
            name = path.relative_to(local_dir).as_posix()
            if path.is_file() and not any(part in skip for part in name.split("/")[:-1]):
                target = self.path(f"{rel}/{name}")
                self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                with self.fs.open_output_stream(target) as out:
                    out.write(path.read_bytes())

    def download(self, dest: Path, rel: str = "", skip: tuple = (RAY_DIR, "adapter", "checkpoints")) -> Path:
        """Mirror the experiment's files (or those under ``rel``) into ``dest``, minus folders
        named in ``skip`` (Ray's state, adapters, checkpoints: the leaderboard needs none)."""
        dest.mkdir(parents=True, exist_ok=True)
        top = self.path(rel)
        selector = pafs.FileSelector(top, recursive=True, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            name = info.path[len(top):].lstrip("/")
            if info.type != pafs.FileType.File or any(part in skip for part in name.split("/")[:-1]):
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(info.path) as src, open(target, "wb") as out:
                out.write(src.read())
        return dest

    def move_aside(self) -> Optional[str]:
        """Rename the experiment to ``<name>.old-<time>`` (never delete results); returns the new name."""
        if not self.exists():
            return None
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        target = f"{self.path()}.old-{stamp}"
        try:
            self.fs.move(self.path(), target)
        except (OSError, NotImplementedError):  # object stores cannot rename folders: copy, then drop
            pafs.copy_files(self.path(), target, source_filesystem=self.fs, destination_filesystem=self.fs)
            self.fs.delete_dir(self.path())
        return f"{self.root}.old-{stamp}"


def local_mirror(exp: str) -> Path:
    """A local folder with the experiment's files: the folder itself, or a download of a URI."""
    storage = Storage(exp)
    if storage.local is not None:
        return storage.local
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in exp)
    return storage.download(Path.home() / ".cache" / "qlora-ray" / "experiments" / safe)


def write_results(exp: str, with_plot: bool = True) -> results.Leaderboard:
    """Write the leaderboard next to the trials (for a URI: into a local mirror, then upload)."""
    storage = Storage(exp)
    folder = local_mirror(exp)
    board = results.write_leaderboard(folder, with_plot=with_plot)
    if storage.local is None:
        for suffix in ("md", "csv", "json", "png"):
            path = folder / f"{results.LEADERBOARD}.{suffix}"
            if path.exists():
                with storage.fs.open_output_stream(storage.path(path.name)) as f:
                    f.write(path.read_bytes())
        best = board.best
        storage.write_text("best.txt", (best.trial_id + "\n") if best else "")
    return board


# ---------------------------------------------------------------- connecting

@dataclass
class Cluster:
    """What the driver is connected to."""

    address: str
    embedded: bool
    dashboard_url: Optional[str]
    log_dir: Optional[str]
    nodes: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def resources(self) -> Dict[str, float]:
        total: Dict[str, float] = {}
        for node in self.nodes:
            for key, value in node.items():
                total[key] = total.get(key, 0.0) + value
        return total


def _dashboard_available() -> bool:
    try:
        from ray._private.utils import get_dashboard_dependency_error
    except ImportError:  # moved in a later Ray: assume ray[default] when aiohttp is there
        import importlib.util

        return importlib.util.find_spec("aiohttp") is not None
    return get_dashboard_dependency_error() is None


@contextlib.contextmanager
def connect(address: Optional[str] = None, dashboard: bool = True,
            dashboard_host: str = "127.0.0.1") -> Iterator[Cluster]:
    """Start an embedded local Ray (dashboard on ``dashboard_host``) or join ``address``.

    Worker output goes to Ray's log files, not this terminal (``log_to_driver=False``); the
    progress table is the terminal's. A Ray already initialized in this process is reused.
    """
    owned = not ray.is_initialized()
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Ray logs a token-auth notice at every start; the dashboard line below says what to do.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if owned:
        common = dict(log_to_driver=False, logging_level=logging.WARNING)
        if address:
            prepare_auth_env()
            try:
                with loopback_node_ip(is_loopback(address)):
                    ctx = ray.init(address=address, **common)
            except Exception as e:  # ConnectionError, auth errors, bad address
                raise UserError(f"--address {address}: cannot connect to Ray: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}\n"
                                "  Start a cluster with `ray start --head`, or check the address "
                                "(auto, host:6379, ray://host:10001).") from None
        else:
            with_dashboard = dashboard and _dashboard_available()
            # address="local": always a new Ray of our own, never one `ray start` left on this machine.
            ctx = _start_local(include_dashboard=with_dashboard,
                               dashboard_host=dashboard_host if with_dashboard else "127.0.0.1", **common)
        url = ctx.dashboard_url or None
        session = ctx.address_info.get("session_dir")
    else:
        url, session = None, None
    try:
        nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
        yield Cluster(address=address or "local", embedded=not address and owned,
                      dashboard_url=f"http://{url}" if url and "://" not in url else url,
                      log_dir=f"{session}/logs" if session else None, nodes=nodes)
    finally:
        if owned:
            ray.shutdown()


# Settings for the processes of the local Ray we start (its raylet takes this process's
# environment; a value the user set wins). Ray Train's controller looks at its workers every 2 s
# by default, so a finished trial waited up to that long, several times over, before Tune saw it
# end: 0.5 s cut teardown from 4.5-4.7 s to 1.2-2.0 s a trial (benchmarks/RESULTS.md). Ray Train
# also starts a process per trial that watches for preempted cloud nodes: on one machine there is
# nothing to watch, and a dozen trials starting at once would start a dozen more processes.
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@contextlib.contextmanager
def _ray_process_env(defaults: Dict[str, str]) -> Iterator[None]:
    """``defaults`` in os.environ (where unset) while Ray's processes are started, then restored."""
    added = {k: v for k, v in defaults.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _start_local(**kwargs):
    """A new local Ray whose node address is 127.0.0.1: its GCS, raylet and workers register
    the loopback address, nothing on this machine's network address."""
    # Ray waits a fixed 30 s for its raylet to register; on a busy 2-core laptop that can run
    # out, and a second start usually succeeds.
    for attempt in range(3):
        try:
            # Ray would swap 127.0.0.1 for this machine's network IP.
            with loopback_node_ip(), _ray_process_env(LOCAL_RAY_ENV):
                return ray.init(address="local", _node_ip_address=LOOPBACK, **kwargs)
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
            log.warning("the local Ray did not start in time (busy machine?); trying again")


# ---------------------------------------------------------------- resources

def check_resources(spec: JobSpec, cluster: Cluster) -> None:
    """Fail now, naming the spec key, if no node can ever hold one trial (else Ray would wait forever)."""
    res = spec.resources
    accel_key = f"accelerator_type:{res.accelerator_type}" if res.accelerator_type else None
    if any(_fits(node, spec) for node in cluster.nodes):
        return
    total = cluster.resources
    gpus = total.get("GPU", 0)
    kinds = sorted(k.split(":", 1)[1] for k in total if k.startswith("accelerator_type:"))
    where = "the local Ray (this machine)" if cluster.embedded else f"the cluster at {cluster.address}"
    problems = []
    if res.gpus_per_trial > 0 and not any(n.get("GPU", 0) >= res.gpus_per_trial for n in cluster.nodes):
        problems.append(f"resources.gpus_per_trial: {res.gpus_per_trial:g} GPU(s) per trial, but {where} has "
                        f"{gpus:g} GPU(s){' in all' if len(cluster.nodes) > 1 else ''}; set "
                        "resources.gpus_per_trial=0 to train on the CPU, or pass --address of a GPU cluster")
    if accel_key and not any(n.get(accel_key) for n in cluster.nodes):
        problems.append(f"resources.accelerator_type: no node of {where} offers '{res.accelerator_type}' "
                        f"(it has: {', '.join(kinds) or 'no typed GPUs'}); drop accelerator_type or use one of those")
    if not any(n.get("CPU", 0) >= res.cpus_per_trial for n in cluster.nodes):
        most = max((n.get("CPU", 0) for n in cluster.nodes), default=0)
        problems.append(f"resources.cpus_per_trial: {res.cpus_per_trial:g} CPUs per trial, but the largest node "
                        f"of {where} has {most:g}; lower resources.cpus_per_trial")
    if not problems:
        problems.append("resources: no single node has the GPUs, CPUs and accelerator type one trial asks for "
                        f"(gpus_per_trial={res.gpus_per_trial:g}, cpus_per_trial={res.cpus_per_trial:g}, "
                        f"accelerator_type={res.accelerator_type})")
    raise UserError("\n".join(problems))


def _fits(node: Dict[str, float], spec: JobSpec, count: int = 1) -> bool:
    res = spec.resources
    ok = node.get("CPU", 0) >= res.cpus_per_trial * count and node.get("GPU", 0) >= res.gpus_per_trial * count
    if res.accelerator_type:
        ok = ok and node.get(f"accelerator_type:{res.accelerator_type}", 0) > 0
    return ok


def slots(spec: JobSpec, cluster: Cluster, most: int) -> int:
    """How many trial-sized slots the cluster's nodes hold together, counting up to ``most``."""
    fit = 0
    for node in cluster.nodes:
        n = 0
        while _fits(node, spec, n + 1) and fit + n < most:
            n += 1
        fit += n
    return fit


def concurrency(spec: JobSpec, cluster: Cluster, n_trials: int) -> int:
    """Trials run at once: the spec's number, else how many fit on the cluster's nodes."""
    if spec.resources.max_concurrent_trials:
        return max(1, min(spec.resources.max_concurrent_trials, n_trials))
    return max(1, slots(spec, cluster, n_trials))


# ---------------------------------------------------------------- the experiment folder

def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def spec_changes(old_yaml: str, spec: JobSpec) -> List[str]:
    """Keys (outside sweep/resources/output) whose values differ from the saved spec."""
    import yaml

    old = _flat(yaml.safe_load(old_yaml) or {})
    new = _flat(yaml.safe_load(to_yaml(spec)) or {})
    changed = []
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in _MUTABLE_KEYS or old.get(key) == new.get(key):
            continue
        changed.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changed


def open_experiment(spec: JobSpec, fresh: bool, say: Callable[[str], None]) -> Storage:
    """The experiment folder, the old one moved aside if ``fresh``; a changed spec is refused."""
    storage = Storage(spec.experiment_dir)
    if fresh:
        moved = storage.move_aside()
        if moved:
            say(f"--fresh: moved the previous experiment to {moved}")
    saved = storage.read_text(SPEC_FILE)
    changes = spec_changes(saved, spec) if saved is not None else []
    if changes:
        raise UserError(
            f"experiment '{spec.name}' in {storage.root} was run with a different spec:\n  "
            + "\n  ".join(changes[:12]) + ("\n  ..." if len(changes) > 12 else "")
            + "\nRe-submit with --fresh to start over (the old folder is kept), or give the job "
              "another name (name=...).")
    return storage


def record_experiment(storage: Storage, spec: JobSpec, spec_path: Path, trials: List[Trial],
                      cluster: Optional[Cluster]) -> None:
    """``spec.yaml`` and ``experiment.json`` (the plan, for results; where Ray's logs are)."""
    storage.write_text(SPEC_FILE, to_yaml(spec))
    plan = storage.read_json(results.EXPERIMENT_FILE) or {}
    known = {t["id"]: t for t in plan.get("trials", [])}
    known.update({t.id: {"id": t.id, "values": t.values} for t in trials})
    plan.update(name=spec.name, spec_file=str(spec_path), sweep_keys=list(spec.sweep),
                trials=list(known.values()), created=plan.get("created", _now()), updated=_now(),
                submits=plan.get("submits", 0) + 1)
    if cluster is not None:
        plan.update(address=cluster.address, dashboard=cluster.dashboard_url, ray_logs=cluster.log_dir)
    storage.write_json(results.EXPERIMENT_FILE, plan)


def trial_status(storage: Storage, trial_id: str) -> Dict[str, Any]:
    return storage.read_json(f"{trial_id}/{results.STATUS_FILE}") or {}


def is_finished(storage: Storage, trial_id: str) -> bool:
    return trial_status(storage, trial_id).get("status") == results.FINISHED


# ---------------------------------------------------------------- baseline (once per experiment)

def _baseline_task(spec: JobSpec) -> str:
    from qlora_ray import evaluate

    return evaluate.baseline(spec).to_json()


def start_baseline(spec: JobSpec, storage: Storage, say: Callable[[str], None],
                   alongside: bool) -> Optional[ray.ObjectRef]:
    """Measure the base model (perplexity, replies) once, as a Ray task placed like a trial.
    ``alongside``: the cluster has room for it beside the trials, so none waits for it (its
    figures are taken when a trial ends; ``finish_baseline`` saves them); else it runs first.
    Returns the running task, or None when the figures are already saved."""
    if storage.exists(results.BASELINE_FILE):
        return None
    res = spec.resources
    options: Dict[str, Any] = {"num_cpus": res.cpus_per_trial, "num_gpus": res.gpus_per_trial, "max_retries": 1}
    if res.accelerator_type:
        options["accelerator_type"] = res.accelerator_type
    ref = ray.remote(_baseline_task).options(**options).remote(spec)
    if alongside:
        say("baseline: measuring the base model once (perplexity, sample replies), alongside the trials ...")
        return ref
    say("baseline: measuring the base model once (perplexity, sample replies) ...")
    start = time.time()
    try:
        text = ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        # The same model and data feed every trial: stop here, with the reason, not a traceback.
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
        raise UserError(f"measuring the base model failed, so no trial was started: {_reason(cause)}") from None
    storage.write_text(results.BASELINE_FILE, text)
    say(f"baseline: done in {time.time() - start:.0f}s -> {storage.uri(results.BASELINE_FILE)}")
    return None


def finish_baseline(ref: Optional[ray.ObjectRef], storage: Storage, say: Callable[[str], None]) -> None:
    """Save the figures of the base-model task running alongside the trials as the experiment's
    ``baseline.json``. If it failed or had not finished (the trials then measured the base model
    themselves), say so and go on: the leaderboard takes each trial's own base figures."""
    if ref is None:
        return
    if not ray.wait([ref], timeout=0)[0]:
        ray.cancel(ref, force=True)
        say("baseline: not done when the trials ended (no room for it?); each trial measured the base model itself")
        return
    try:
        text = ray.get(ref)
    except ray.exceptions.RayError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
        reason = _reason(cause)
        if not reason.startswith(type(cause).__name__):
            reason = f"{type(cause).__name__}: {reason}"
        say(f"baseline: measuring the base model failed ({reason}); each trial measured it itself")
        return
    storage.write_text(results.BASELINE_FILE, text)
    say(f"baseline: saved {storage.uri(results.BASELINE_FILE)}")


def _base_figures(ref: Optional[ray.ObjectRef]) -> Optional[Callable[[], Optional[evaluate.Baseline]]]:
    """For ``train.RunContext.base_figures``: the base-model task's figures if it has finished by
    the time a trial asks, else None (the trial measures them itself rather than wait: the task
    may be queued behind the trials for a GPU)."""
    if ref is None:
        return None

    def figures() -> Optional[evaluate.Baseline]:
        from qlora_ray import evaluate

        if not ray.wait([ref], timeout=0)[0]:
            return None
        try:
            return evaluate.Baseline.from_json(ray.get(ref))
        except ray.exceptions.RayError:
            return None
    return figures


# ---------------------------------------------------------------- the worker (one per trial)

@dataclass
class Sweep:
    """What every trial function needs; shipped once through the object store."""

    exp: str
    trials: Dict[str, Trial]
    baseline: Optional[str]  # the base figures (JSON) when an earlier submit saved them
    baseline_ref: Optional[ray.ObjectRef] = None  # else the base-model task running alongside
    fault_step: Optional[int] = None
    crash_trial: Optional[str] = None


def _worker_loop(config: Dict[str, Any], session: TrialSession = TRAIN_SESSION) -> None:
    """Runs in the Ray Train worker (or the Tune trial itself, runner tune): resume from the
    last checkpoint, then ``train.fit``."""
    entered = time.time()
    from qlora_ray import evaluate, train

    trial: Trial = config["trial"]
    storage = Storage(config["exp"])
    # Trials write their folder directly when the experiment is a path; for a URI they write a
    # local staging folder that is uploaded after every report.
    if storage.is_local_path:
        trial_dir = Path(storage.path(trial.id))
    else:
        # A restarted worker may be on another node: start from what storage holds (its metric
        # history, events), not from a stale local copy.
        trial_dir = Path(tempfile.gettempdir()) / "qlora-ray" / trial.spec.name / trial.id
        shutil.rmtree(trial_dir, ignore_errors=True)
        storage.download(trial_dir, rel=trial.id)
    trial_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = session.get_checkpoint()
    fault_step = config.get("fault_step")
    marker = trial_dir / ".test-killed"

    def sync(full: bool) -> None:
        if storage.is_local_path:
            return
        if full:
            storage.upload(trial_dir, trial.id)
        else:
            for name in (results.METRICS_FILE, EVENTS_FILE):
                if (trial_dir / name).exists():
                    storage.write_text(f"{trial.id}/{name}", (trial_dir / name).read_text(encoding="utf-8"))

    final: Dict[str, Any] = {}

    def report(metrics: Dict[str, Any], checkpoint_dir: Optional[str] = None) -> None:
        if metrics.get("done"):
            final.update(metrics)
        if fault_step and metrics.get("step") == fault_step and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)  # the test's "node died": no cleanup, no report
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        session.report(_to_tune(metrics), checkpoint=ckpt)
        sync(full=bool(metrics.get("done")))

    with (checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)) as resume_from:
        with open(trial_dir / EVENTS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": "start", "time": _now(), "pid": os.getpid(), "host": socket.gethostname(),
                                "node_id": ray.get_runtime_context().get_node_id(),
                                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                "resume_from": resume_from}) + "\n")
        baseline = evaluate.Baseline.from_json(config["baseline"]) if config.get("baseline") else None
        fit_started = time.time()
        try:
            gpus = trial.spec.resources.gpus_per_trial
            train.fit(trial.spec, report, train.RunContext(
                trial_dir=str(trial_dir), resume_from=resume_from, baseline=baseline,
                base_figures=None if baseline else _base_figures(config.get("baseline_ref")),
                gpu_memory_fraction=gpus if 0 < gpus < 1 else None))
        except (UserError, train.NonFiniteLossError, train.OutOfMemory) as e:
            # Deterministic: a retry would fail the same way. End the run with the reason instead
            # of raising (which would make Ray Train restart the worker max_failures times).
            final.update(done=False, error=f"{type(e).__name__}: {e}")
    # Where the time outside train.fit goes (the trial function adds Ray's start-up and teardown).
    final["timing"] = {"worker_entered": entered, "fit_started": fit_started, "fit_ended": time.time()}
    sync(full=True)
    # Train's Result carries the metrics of the last *checkpoint*; the trial function needs the
    # final report itself, so it travels through storage.
    storage.write_json(f"{trial.id}/{RESULT_FILE}", final)


def _to_tune(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Tune reserves ``done`` (it ends the trial on the spot, before ``fit`` returns): rename it."""
    out = dict(metrics)
    if "done" in out:
        out[FINAL_KEY] = bool(out.pop("done"))
    return out


def _torch_trainer(trial: Trial, storage: Storage, loop_config: Dict[str, Any]):
    """The trial's TorchTrainer: one worker with the trial's resources, restarted by Train."""
    # Imported here, in the trial's process: it pulls in torch, which the driver never needs.
    from ray.train.torch import TorchConfig, TorchTrainer

    res = trial.spec.resources
    per_worker = {"CPU": res.cpus_per_trial}
    if res.gpus_per_trial:
        per_worker["GPU"] = res.gpus_per_trial
    return TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        # One worker needs no collective ops: gloo runs anywhere, including hosts whose "GPUs"
        # are logical labels (CI, the multi-node tests), where NCCL would fail to initialize.
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=res.gpus_per_trial > 0, resources_per_worker=per_worker,
            accelerator_type=res.accelerator_type),
        run_config=ray.train.RunConfig(
            name=trial.id, storage_path=storage.uri(f"{RAY_DIR}/train"),
            failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()]),
    )


def _run_trial(config: Dict[str, Any], sweep: Sweep) -> None:
    """One Tune trial: fit it (in its TorchTrainer, or right here with runner tune); stamp ``status.json``."""
    trial = sweep.trials[config["trial_id"]]
    storage = Storage(sweep.exp)
    res = trial.spec.resources
    rel = f"{trial.id}/{results.STATUS_FILE}"
    before = storage.read_json(rel) or {}
    start = time.time()
    status = {"trial_id": trial.id, "values": trial.values, "status": results.RUNNING, "reason": None,
              "submits": before.get("submits", 0) + 1, "started_at": _now(),
              "total_steps": trial.spec.train.max_steps}
    storage.write_json(rel, status)
    storage.delete(f"{trial.id}/{RESULT_FILE}")  # only this run's final report counts
    if sweep.crash_trial == trial.id:
        raise RuntimeError(f"{DRIVER_FAULT_ENV}: the trial driver of {trial.id} crashed on purpose")
    loop_config = {"trial": trial, "exp": sweep.exp, "baseline": sweep.baseline,
                   "baseline_ref": sweep.baseline_ref, "fault_step": sweep.fault_step}
    error: Optional[str] = None
    final: Dict[str, Any] = {}
    try:
        if res.runner == "tune":
            _worker_loop(loop_config, TUNE_SESSION)
        else:
            _torch_trainer(trial, storage, loop_config).fit()
        final = storage.read_json(f"{trial.id}/{RESULT_FILE}") or {}
        if not final.get("done"):
            error = final.pop("error", None) or "training ended without a final report"
    except Exception as e:  # TrainingFailedError after max_failures retries, or a controller error
        if res.runner == "tune":
            raise  # Tune restarts the trial from its last checkpoint (resources.max_failures times)
        error = _reason(e)
    # Wall time of the trial as Ray ran it, summed over submits when an earlier one was cut short.
    ended = time.time()
    wall = ended - start + (before.get("trial_wall_s") or 0.0)
    timing = final.pop("timing", None)
    if timing:
        # This run's time outside train.fit: Ray starting the worker, the worker's imports and
        # resume, and Ray tearing it down (retries fold into the first and last).
        status["overhead"] = {"worker_start_s": round(timing["worker_entered"] - start, 2),
                              "worker_setup_s": round(timing["fit_started"] - timing["worker_entered"], 2),
                              "teardown_s": round(ended - timing["fit_ended"], 2)}
    status.update(status=results.FAILED if error else results.FINISHED, reason=error, ended_at=_now(),
                  trial_wall_s=round(wall, 2), attempts=_count_starts(storage, trial.id), result=final or None)
    storage.write_json(rel, status)
    tune.report({"trial_state": status["status"], "reason": error or ""})


def stamp_failed(storage: Storage, trial_id: str, reason: str) -> Dict[str, Any]:
    """Stamp ``status.json`` of a trial whose Tune trial errored: failed, with ``reason``. A
    trial that had already ended (finished or failed, stamped by its own function) keeps that."""
    rel = f"{trial_id}/{results.STATUS_FILE}"
    status = storage.read_json(rel) or {"trial_id": trial_id}
    if status.get("status") in (results.FINISHED, results.FAILED):
        return status
    status.update(status=results.FAILED, reason=reason, ended_at=_now(), attempts=_count_starts(storage, trial_id))
    try:
        storage.write_json(rel, status)
    except OSError as e:  # a full disk, say: the progress line still says why
        log.warning("cannot stamp %s failed: %s", rel, e)
    return status


def _tune_error(trial) -> str:
    """Why Tune marked ``trial`` ERROR, in one line (from the error file Tune wrote for it)."""
    text = None
    with contextlib.suppress(Exception):
        path = trial.error_file
        if path and os.path.isfile(path):
            text = Path(path).read_text(encoding="utf-8", errors="replace")
    if not text:
        with contextlib.suppress(Exception):
            text = trial.get_error()
    return f"trial driver crashed: {_reason(text)}" if text else "trial driver crashed (see Ray logs)"


def _count_starts(storage: Storage, trial_id: str) -> Optional[int]:
    text = storage.read_text(f"{trial_id}/{EVENTS_FILE}")
    return sum(1 for line in text.splitlines() if '"start"' in line) if text else None


def _reason(error: BaseException) -> str:
    """One line a leaderboard can show: the innermost error's last line."""
    text = str(error).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line or "Exception" in line:
            return line[:300]
    return (lines[-1] if lines else type(error).__name__)[:300]


# ---------------------------------------------------------------- progress on the terminal

class Progress(tune.Callback):
    """One line per trial (state, step, loss, ETA) instead of Ray's log stream.

    On a terminal it is a live table; elsewhere (a Ray job's log, a pipe) it prints one line
    when a trial changes state and at most every ``every_s`` seconds while it trains.
    """

    def __init__(self, trials: List[Trial], console, skipped: int = 0, every_s: float = 30.0,
                 exp: Optional[str] = None):
        self.trials = trials
        self.exp = exp  # the experiment folder: a trial Tune marks ERROR is stamped failed there
        self.console = console
        self.skipped = skipped
        self.every_s = every_s
        self.state: Dict[str, Dict[str, Any]] = {t.id: {"state": "pending"} for t in trials}
        self.live = None
        self._last_print: Dict[str, float] = {}

    def __getstate__(self):
        # Tune pickles its callbacks into the experiment state; the console and Live hold locks.
        return {k: v for k, v in self.__dict__.items() if k not in ("console", "live")}

    def __setstate__(self, state):
        self.__dict__.update(state, console=None, live=None)

    # -- tune hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trial.config["trial_id"], state="running", started=time.time())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid = trial.config["trial_id"]
        if "trial_state" in result:
            self._update(tid, state=result["trial_state"], reason=result.get("reason") or None)
            return
        row = self.state[tid]
        now = time.time()
        step = result.get("step")
        changes: Dict[str, Any] = {}
        if step is not None and row.get("step") is not None and step <= row["step"]:
            # The step went back: Ray Train restarted a dead worker from the last checkpoint.
            changes["restarts"] = row.get("restarts", 0) + 1
            changes["reason"] = f"worker restarted ({changes['restarts']}x), resumed before step {step}"
            row.pop("first", None)  # the ETA restarts too
        if step is not None and "first" not in row:
            row["first"] = (now, step)
        self._update(tid, state="running", step=step, loss=result.get("loss", row.get("loss")),
                     total=result.get("total_steps", row.get("total")), eval_ppl=result.get("eval_ppl"),
                     now=now, **changes)

    def on_trial_complete(self, iteration, trials, trial, **info):
        tid = trial.config["trial_id"]
        if self.state[tid]["state"] == "running":
            self._update(tid, state="finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        # The trial function raised or its process died, so it never stamped status.json itself.
        tid = trial.config["trial_id"]
        status = stamp_failed(Storage(self.exp), tid, _tune_error(trial)) if self.exp else {}
        self._update(tid, state=status.get("status") or "failed",
                     reason=status.get("reason") or "trial driver crashed (see Ray logs)")

    # -- rendering
    def __enter__(self):
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self.table(), console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.update(self.table())
            self.live.__exit__(*exc)

    def _update(self, tid: str, **changes) -> None:
        row = self.state[tid]
        before = (row.get("state"), row.get("reason"))
        row.update(changes)
        if self.live is not None:
            self.live.update(self.table())
            return
        now = time.time()
        if (row["state"], row.get("reason")) != before or now - self._last_print.get(tid, 0) >= self.every_s:
            self._last_print[tid] = now
            self.console.print(self.line(tid), markup=False, highlight=False, soft_wrap=True)

    def eta(self, row: Dict[str, Any]) -> Optional[float]:
        first, step, total = row.get("first"), row.get("step"), row.get("total")
        if not first or step is None or not total or step <= first[1]:
            return None
        rate = (row.get("now", time.time()) - first[0]) / (step - first[1])
        return max(0.0, (total - step) * rate)

    def cells(self, tid: str) -> List[str]:
        row = self.state[tid]
        step = "" if row.get("step") is None else f"{row['step']}/{row['total']}" if row.get("total") else str(row["step"])
        eta = self.eta(row) if row["state"] == "running" else None
        ppl = f"ppl {row['eval_ppl']:.2f}" if isinstance(row.get("eval_ppl"), (int, float)) else ""
        return [tid, row["state"], step,
                f"{row['loss']:.4f}" if isinstance(row.get("loss"), (int, float)) else "",
                _duration(eta) if eta is not None else "", ppl or (row.get("reason") or "")]

    def line(self, tid: str) -> str:
        tid_, state, step, loss, eta, extra = self.cells(tid)
        parts = [f"[{state:>8}] {tid_}"]
        if step:
            parts.append(f"step {step}")
        if loss:
            parts.append(f"loss {loss}")
        if eta:
            parts.append(f"ETA {eta}")
        if extra:
            parts.append(extra)
        return "  ".join(parts)

    def table(self):
        from rich.table import Table

        done = sum(1 for r in self.state.values() if r["state"] in ("finished", "failed"))
        title = f"{done}/{len(self.trials)} trials done" + (f" ({self.skipped} finished earlier)" if self.skipped else "")
        table = Table(title=title, title_justify="left")
        for name, justify in (("trial", "left"), ("state", "left"), ("step", "right"), ("loss", "right"),
                              ("ETA", "right"), ("", "left")):
            table.add_column(name, justify=justify)
        for trial in self.trials:
            table.add_row(*self.cells(trial.id))
        return table


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ---------------------------------------------------------------- submit

@contextlib.contextmanager
def _quiet_ray_loggers() -> Iterator[None]:
    """Tune and Train log every trial error with a traceback; the table and status.json say it."""
    names = ("ray.tune", "ray.train", "ray.air")
    levels = {n: logging.getLogger(n).level for n in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def run_grid(spec: JobSpec, storage: Storage, todo: List[Trial], baseline_ref: Optional[ray.ObjectRef],
             cluster: Cluster, console, skipped: int = 0) -> None:
    """The Tune grid over ``todo`` (each trial a TorchTrainer, or its own trainer with runner
    tune); returns when all have ended."""
    fault = os.environ.get(FAULT_ENV)
    sweep = Sweep(exp=storage.root, trials={t.id: t for t in todo}, baseline=storage.read_text(results.BASELINE_FILE),
                  baseline_ref=baseline_ref, fault_step=int(fault) if fault else None,
                  crash_trial=os.environ.get(DRIVER_FAULT_ENV) or None)
    limit = concurrency(spec, cluster, len(todo))
    console.print(f"running {len(todo)} trial(s), {limit} at a time"
                  + (f"; {skipped} already finished (skipped)" if skipped else ""), highlight=False)
    progress = Progress(todo, console, skipped=skipped, exp=storage.root)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_run_trial, sweep=sweep), trial_resources(spec.resources)),
        param_space={"trial_id": tune.grid_search([t.id for t in todo])},
        tune_config=tune.TuneConfig(
            # A trial's driver process is handed to the next trial instead of a fresh one (~6 s
            # of process start and imports saved per trial after the first wave).
            max_concurrent_trials=limit, reuse_actors=True,
            trial_name_creator=lambda t: t.config["trial_id"],
            trial_dirname_creator=lambda t: t.config["trial_id"]),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=storage.uri(RAY_DIR), verbose=0, callbacks=[progress],
            # Runner train: Ray Train restarts a dead worker; a Tune retry would start it twice over.
            failure_config=tune.FailureConfig(
                max_failures=spec.resources.max_failures if spec.resources.runner == "tune" else 0),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
    )
    interrupted = True
    try:
        with _quiet_ray_loggers(), progress:
            tuner.fit()
        interrupted = False
    finally:
        # A trial still marked running after the grid ended (Ctrl-C, a dead driver) is stopped;
        # the next submit resumes it from its checkpoint.
        for trial in todo:
            status = trial_status(storage, trial.id)
            if status.get("status") == results.RUNNING:
                status.update(status=results.STOPPED, ended_at=_now(),
                              reason="interrupted" if interrupted else "ended without a result")
                storage.write_json(f"{trial.id}/{results.STATUS_FILE}", status)


def submit(spec_path: Path, overrides: List[str], console, address: Optional[str] = None, fresh: bool = False,
           dashboard: bool = True, dashboard_host: str = "127.0.0.1") -> tuple[results.Leaderboard, str]:
    """Run (or resume) the experiment of ``spec_path`` in the foreground; its leaderboard and folder."""
    spec = load_spec(spec_path, overrides)
    trials = expand(spec)

    def say(text: str) -> None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)

    storage = open_experiment(spec, fresh, say)
    say(f"experiment: {storage.root} ({len(trials)} trial(s))")
    todo = [t for t in trials if not is_finished(storage, t.id)]
    skipped = len(trials) - len(todo)
    if not todo:
        say(f"all {len(trials)} trial(s) already finished; nothing to run (use --fresh to start over)")
    else:
        with connect(address, dashboard=dashboard, dashboard_host=dashboard_host) as cluster:
            if cluster.dashboard_url:
                say(f"Ray dashboard: {cluster.dashboard_url}  (token: `ray get-auth-token`)")
            if cluster.log_dir:
                say(f"Ray logs: {cluster.log_dir}  (worker output: worker-*.out, Ray Train: train/)")
            if len(cluster.nodes) > 1 and storage.is_local_path:
                say(f"note: trials write {storage.root} on the node they run on; on a multi-node "
                    "cluster use a shared filesystem or a storage URI (output.dir=s3://...)")
            check_resources(spec, cluster)  # before anything is written: a refused spec leaves no trace
            record_experiment(storage, spec, spec_path, trials, cluster)
            # Beside the trials if a slot is left over for it (no GPU idles while it runs), else first.
            room = slots(spec, cluster, len(todo) + 1) > concurrency(spec, cluster, len(todo))
            baseline_ref = start_baseline(spec, storage, say, alongside=room)
            run_grid(spec, storage, todo, baseline_ref, cluster, console, skipped=skipped)
            finish_baseline(baseline_ref, storage, say)
    return write_results(storage.root), storage.root


# ---------------------------------------------------------------- --detach (Ray Jobs)

def _job_client(address: Optional[str]):
    from ray.job_submission import JobSubmissionClient

    from qlora_ray.cluster import prepare_auth_env

    prepare_auth_env()
    # The SDK pins its loggers to INFO ("Uploading package ...", "WebSocket closed ..."): quieter.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, ValueError (no running cluster found)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--detach needs a running Ray cluster to submit to ({address or 'auto-detect'}): {first}\n"
                        "  Start one with `ray start --head` (then --address auto), or pass "
                        "--address http://HEAD:8265 / ray://HEAD:10001.") from None


def _is_local(url: str) -> bool:
    host = url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost", "0.0.0.0", socket.gethostname()) or host == _own_ip()


def _own_ip() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return ""


def submit_detached(spec_path: Path, overrides: List[str], console, address: Optional[str] = None,
                    fresh: bool = False) -> Dict[str, Any]:
    """Submit ``qlora-ray submit SPEC ...`` as a Ray Job and return at once; record ``job.json``."""
    spec = load_spec(spec_path, overrides)
    expand(spec)  # a bad sweep fails here, not on the cluster
    client = _job_client(address)
    api = client.get_address()
    storage = Storage(spec.experiment_dir)
    local_cluster = _is_local(api)
    previous = storage.read_json(JOB_FILE)
    if previous:
        try:
            state = str(client.get_job_status(previous["job_id"]))
        except Exception:
            state = "UNKNOWN"
        if state.endswith(("PENDING", "RUNNING")):
            raise UserError(f"experiment '{spec.name}' is already running as job {previous['job_id']}; "
                            f"follow it with `qlora-ray status {spec.name}` (or stop it: ray job stop {previous['job_id']})")
    runtime_env: Dict[str, Any] = {"env_vars": {"RAY_AIR_NEW_OUTPUT": "0", "PYTHONUNBUFFERED": "1"}}
    if local_cluster:
        # Same machine, same files: the job reads the spec where it is; nothing to ship.
        python, job_spec, args, shipped = shlex.quote(sys.executable), str(spec_path.resolve()), list(overrides), {}
    else:
        # The cluster's Python, which must have qlora-ray installed (the runtime/ configs do).
        python = shlex.quote(os.environ.get(JOB_PYTHON_ENV, "python"))
        job_spec, args, shipped = _ship(spec, spec_path, overrides)
        runtime_env.update(shipped)
    if fresh:
        if local_cluster or not storage.is_local_path:
            moved = storage.move_aside()  # here, so job.json below lands in the new folder
            if moved:
                console.print(f"--fresh: moved the previous experiment to {moved}", highlight=False)
        else:
            args.append("--fresh")
    entrypoint = " ".join([python, "-m", "qlora_ray", "submit", shlex.quote(job_spec),
                           *(shlex.quote(a) for a in args), "--address", "auto"])
    submission_id = f"qlora-ray-{spec.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint, submission_id=submission_id,
            runtime_env=runtime_env, metadata={"qlora_ray_experiment": spec.name})
    except Exception as e:
        raise UserError(f"--detach: the cluster at {api} refused the job: {str(e).strip().splitlines()[0]}") from None
    record = {"job_id": job_id, "name": spec.name, "address": api, "submitted_at": _now(), "entrypoint": entrypoint,
              "working_dir": shipped.get("working_dir"), "spec": job_spec, "experiment": storage.root}
    storage.write_json(JOB_FILE, record)
    if not local_cluster and storage.is_local_path:
        console.print(f"note: the job writes {storage.root} on the cluster's head node; use a storage URI "
                      "(output.dir=s3://...) to read results from here", highlight=False)
    return record


def _ship(spec: JobSpec, spec_path: Path, overrides: List[str]) -> tuple[str, List[str], Dict[str, Any]]:
    """What a remote cluster gets (spec path there, its arguments, runtime_env): the project folder,
    so relative paths in the spec resolve the same way there; or, for a spec outside any project,
    only the resolved spec (absolute paths), never whatever folder it sits in (a home, say)."""
    root = project_root(spec_path.resolve().parent)
    if (root / "pyproject.toml").exists() or (root / ".git").exists():
        excludes = [".git", ".venv", "venv", "runs", ".whl", "__pycache__", "*.egg-info", ".pytest_cache",
                    f"{RAY_DIR}/"]
        if not _is_uri(spec.output.dir) and Path(spec.output.dir).resolve().is_relative_to(root):
            excludes.append(str(Path(spec.output.dir).resolve().relative_to(root)))
        # The output folder is pinned to what this machine resolved: a URI, or that path on the head.
        return (str(spec_path.resolve().relative_to(root)), [*overrides, f"output.dir={spec.output.dir}"],
                {"working_dir": str(root), "excludes": list(dict.fromkeys(excludes))})
    folder = Path(tempfile.mkdtemp(prefix="qlora-ray-job-"))
    (folder / f"{spec.name}.yaml").write_text(to_yaml(spec), encoding="utf-8")  # overrides applied
    return f"{spec.name}.yaml", [], {"working_dir": str(folder)}


def job_status(record: Dict[str, Any]) -> Dict[str, Any]:
    client = _job_client(record["address"])
    info = client.get_job_info(record["job_id"])
    return {"job_id": record["job_id"], "status": str(info.status).rsplit(".", 1)[-1],
            "message": info.message, "start_time": info.start_time, "end_time": info.end_time,
            "address": record["address"]}


def job_logs(record: Dict[str, Any], follow: bool = False, write: Callable[[str], None] = print) -> None:
    client = _job_client(record["address"])
    if not follow:
        write(client.get_job_logs(record["job_id"]))
        return
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(record["job_id"]):
            write(chunk)

    asyncio.run(tail())
