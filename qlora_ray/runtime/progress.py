"""The sweep on the terminal: one line (or one table row) per trial with its state, step, loss
and ETA, instead of Ray's log stream. It renders only: the trial's status is written by
``experiment``, which it is handed as ``on_error``."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

from ray import tune

from qlora_ray.plan import Trial
from qlora_ray.records import TrialStatus
from qlora_ray.runtime.ray_compat import tune_trial_error


class Progress(tune.Callback):
    """One line per trial (state, step, loss, ETA) instead of Ray's log stream.

    On a terminal it is a live table; elsewhere (a Ray job's log, a pipe) it prints one line
    when a trial changes state and at most every ``every_s`` seconds while it trains.
    """

    def __init__(self, trials: List[Trial], console, skipped: int = 0, every_s: float = 30.0,
                 on_error: Optional[Callable[[str, str], TrialStatus]] = None,
                 on_complete: Optional[Callable[[str], Optional[TrialStatus]]] = None):
        self.trials = trials
        # Asked, for a trial that ended without its own final report (a scheduler stopped it), for its status.
        self.on_complete = on_complete
        # Told when Tune marks a trial ERROR (its id, Tune's error text); returns the trial's status.
        self.on_error = on_error
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
            self._update(tid, state=result["trial_state"], reason=result.get("reason") or None,
                         eval_ppl=result.get("eval_ppl"))
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
            status = self.on_complete(tid) if self.on_complete else None
            if status is not None and status.status.value == "pruned":
                self._update(tid, state="pruned", reason=f"pruned @ step {status.pruned_step}",
                             eval_ppl=status.pruned_eval_ppl)
            else:
                self._update(tid, state="finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        # The trial function raised or its process died, so it never stamped its end itself.
        tid = trial.config["trial_id"]
        status = self.on_error(tid, tune_trial_error(trial)) if self.on_error else None
        self._update(tid, state=status.status.value if status else "failed",
                     reason=(status.reason if status else None) or "trial driver crashed (see Ray logs)")

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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
