"""Experiment trackers: every trial is one run in MLflow, Weights & Biases and/or TensorBoard.

One :class:`Tracker` serves both ways of training: ``submit`` drives it from a Tune callback in
the submitting process (``runtime.tracking``), ``qlora-ray train`` from the ``report`` it passes
to ``fit``. The training loop never sees it. A run holds the resolved spec flattened as
parameters, the logged steps' figures, the final base/tuned perplexity, and ``samples.md`` and
the leaderboard as artifacts.

A tracker that fails (a server that cannot be reached, a full disk) is switched off for that
trial and the failure kept in :attr:`Tracker.errors`, never raised: tracking never fails training.
The runtime writes them to the trial's ``tracking.json``, which the leaderboard shows.
No Ray here, and each tracker's package is imported only when a spec asks for it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import yaml

from qlora_ray import layout
from qlora_ray.records import FinalMetrics, StepMetrics, is_number
from qlora_ray.spec import JobSpec, TrackingSpec, to_yaml

log = logging.getLogger(__name__)

PARAM_CHARS = 500                # MLflow caps a parameter value; a long list is cut, not refused
# Step figures a run logs: what the loop reports per step, plus any periodic evaluation (eval_*).
STEP_KEYS = tuple(k for k in StepMetrics.__dataclass_fields__ if k not in ("step", "total_steps"))
FINAL_KEYS = ("base_ppl", "eval_ppl", "ppl_change", "train_loss", "tokens_per_s", "peak_mem_gb", "wall_s")


def wanted(spec: TrackingSpec) -> bool:
    """Whether the spec asks for any tracker."""
    return spec.tensorboard or spec.mlflow.tracking_uri is not None or spec.wandb.project is not None


def flat_params(spec: JobSpec) -> Dict[str, str]:
    """The resolved spec as ``dotted.key -> text`` (its sweep and tracking sections left out)."""
    out: Dict[str, str] = {}

    def walk(tree: Any, prefix: str) -> None:
        if isinstance(tree, dict):
            for key, value in tree.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix.rstrip(".")] = str(tree)[:PARAM_CHARS]

    tree = yaml.safe_load(to_yaml(spec)) or {}
    for skipped in ("sweep", "tracking"):
        tree.pop(skipped, None)
    walk(tree, "")
    return out


def step_figures(metrics: Dict[str, Any]) -> Dict[str, float]:
    """The numbers of a reported step worth a chart (finite, known or ``eval_*`` keys)."""
    return {k: float(v) for k, v in metrics.items()
            if (k in STEP_KEYS or k.startswith("eval_")) and is_number(v)}


def final_figures(final: FinalMetrics) -> Dict[str, float]:
    """A finished trial's figures, as ``final.<name>`` metrics."""
    return {f"final.{k}": float(getattr(final, k)) for k in FINAL_KEYS if is_number(getattr(final, k))}


# ---------------------------------------------------------------- the trackers

class _MLflow:
    name = "mlflow"

    def __init__(self, spec: TrackingSpec, job: str, local_dir: Path):
        # An unreachable server should fail once, quickly, not retry for minutes inside the
        # process that drives the sweep. A user's own settings win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        uri = spec.mlflow.tracking_uri or ""
        if uri.startswith("file:") or "://" not in uri:
            # A spec naming a folder asks for MLflow's file store, which MLflow 3 keeps behind
            # this switch (maintenance mode, still working): the spec's word opts in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=spec.mlflow.tracking_uri)
        self.experiment, self.job = spec.mlflow.experiment or job, job

    def start(self, trial_id: str, spec: JobSpec) -> str:
        client = self.client
        exp = client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(self.experiment)
        quoted = trial_id.replace("'", "\\'")
        found = client.search_runs([exp_id], filter_string=f"tags.`qlora_ray.trial` = '{quoted}'", max_results=1)
        if found:  # a re-submit continues the trial, so it continues the run
            run_id, known = found[0].info.run_id, found[0].data.params
            client.update_run(run_id, status="RUNNING")
        else:
            run = client.create_run(exp_id, run_name=trial_id,
                                    tags={"qlora_ray.trial": trial_id, "qlora_ray.job": self.job})
            run_id, known = run.info.run_id, {}
        from mlflow.entities import Param

        # Keys a re-submit may change (resources, output) keep their first value: MLflow refuses a change.
        params = [Param(k, v) for k, v in flat_params(spec).items() if k not in known]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            client.log_batch(run_id, params=params[i:i + 100])
        client.log_text(run_id, to_yaml(spec), "resolved_spec.yaml")
        return run_id

    def log(self, run_id: str, figures: Dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, stamp, step) for k, v in figures.items()])

    def artifact(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path))

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, {"finished": "FINISHED", "failed": "FAILED"}.get(status, "KILLED"))


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, spec: TrackingSpec, job: str, local_dir: Path):
        self.root = local_dir / layout.TENSORBOARD_DIR

    def start(self, trial_id: str, spec: JobSpec):
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(logdir=str(self.root / trial_id), flush_secs=10)
        writer.add_text("resolved_spec", "```yaml\n" + to_yaml(spec) + "```")
        return writer

    def log(self, writer, figures: Dict[str, float], step: int) -> None:
        for key, value in figures.items():
            writer.add_scalar(key, value, step)
        writer.flush()

    def artifact(self, writer, path: Path) -> None:
        if path.suffix == ".md":  # samples and the leaderboard read fine as TensorBoard text
            writer.add_text(path.stem, path.read_text(encoding="utf-8"))

    def end(self, writer, status: str) -> None:
        writer.close()


class _Wandb:
    name = "wandb"

    def __init__(self, spec: TrackingSpec, job: str, local_dir: Path):
        import wandb

        self.wandb, self.spec, self.job = wandb, spec.wandb, job
        self.dir = local_dir / layout.WANDB_DIR

    def start(self, trial_id: str, spec: JobSpec):
        self.dir.mkdir(parents=True, exist_ok=True)
        run_id = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{self.job}-{trial_id}")[:120]
        return self.wandb.init(project=self.spec.project, mode=self.spec.mode, name=trial_id, id=run_id,
                               group=self.job, dir=str(self.dir), config=flat_params(spec), resume="allow",
                               reinit="create_new")

    def log(self, run, figures: Dict[str, float], step: int) -> None:
        run.log(figures, step=step)

    def artifact(self, run, path: Path) -> None:
        run.save(str(path), base_path=str(path.parent), policy="now")

    def end(self, run, status: str) -> None:
        run.finish(exit_code=0 if status == "finished" else 1)


def _backends(spec: TrackingSpec) -> List[type]:
    chosen = []
    if spec.mlflow.tracking_uri is not None:
        chosen.append(_MLflow)
    if spec.wandb.project is not None:
        chosen.append(_Wandb)
    if spec.tensorboard:
        chosen.append(_TensorBoard)
    return chosen


# ---------------------------------------------------------------- the sink both callers use

class Tracker:
    """The runs of one experiment's trials in every tracker the spec asks for.

    ``start`` a trial's runs, ``log_step`` its reported steps, ``log_final`` its figures and
    samples, ``log_artifact`` more files (the leaderboard), ``end`` them. ``local_dir`` is where
    file-based trackers (TensorBoard, W&B offline) write.
    """

    def __init__(self, spec: JobSpec, local_dir: Path):
        self.spec, self.local_dir = spec.tracking, Path(local_dir)
        self.backends: List[Any] = []
        self.runs: Dict[str, Dict[str, Any]] = {}
        self.errors: Dict[str, List[str]] = {}
        self._broken: List[str] = []  # trackers that could not even be set up
        for cls in _backends(self.spec):
            try:
                self.backends.append(cls(self.spec, spec.name, self.local_dir))
            except Exception as e:  # noqa: BLE001 (tracking never fails training)
                self._broken.append(f"{cls.name}: {_why(e)}")

    def start(self, trial_id: str, spec: JobSpec) -> None:
        """Open (or, for a resumed trial, reopen) the trial's run in each tracker."""
        if trial_id in self.runs:
            return
        self.runs[trial_id] = {}
        for problem in self._broken:
            self._fail(trial_id, problem)
        for backend in self.backends:
            run = self._call(trial_id, backend, lambda: backend.start(trial_id, spec))
            if run is not None:
                self.runs[trial_id][backend.name] = run

    def log_step(self, trial_id: str, metrics: Dict[str, Any]) -> None:
        """A reported step's figures (the report's ``step`` is the x axis)."""
        figures, step = step_figures(metrics), metrics.get("step")
        if figures and step is not None:
            self._each(trial_id, lambda b, run: b.log(run, figures, int(step)))

    def log_final(self, trial_id: str, final: FinalMetrics, samples: Optional[Path] = None) -> None:
        """The finished trial's figures (at its last step) and its ``samples.md``."""
        self._each(trial_id, lambda b, run: b.log(run, final_figures(final), final.step))
        if samples is not None and samples.is_file():
            self.log_artifact(trial_id, [samples])

    def log_artifact(self, trial_id: str, paths: Iterable[Path]) -> None:
        for path in paths:
            self._each(trial_id, lambda b, run: b.artifact(run, path))

    def end(self, trial_id: str, status: str) -> None:
        """Close the trial's runs with its status (finished, failed, stopped)."""
        self._each(trial_id, lambda b, run: b.end(run, status))
        self.runs.pop(trial_id, None)

    def _each(self, trial_id: str, act: Callable[[Any, Any], None]) -> None:
        runs = self.runs.get(trial_id, {})
        for backend in self.backends:
            if backend.name in runs:
                self._call(trial_id, backend, lambda: act(backend, runs[backend.name]))

    def _call(self, trial_id: str, backend, act: Callable[[], Any]) -> Any:
        try:
            return act()
        except Exception as e:  # noqa: BLE001 (tracking never fails training)
            self.runs.get(trial_id, {}).pop(backend.name, None)  # off for this trial from now on
            self._fail(trial_id, f"{backend.name}: {_why(e)}")
            return None

    def _fail(self, trial_id: str, problem: str) -> None:
        log.warning("tracking failed for %s: %s", trial_id, problem)
        self.errors.setdefault(trial_id, []).append(problem)


def _why(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
