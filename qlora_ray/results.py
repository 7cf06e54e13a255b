"""Results: one leaderboard from the per-trial files of an experiment folder.

Pure file work (no torch, no ray), so it runs on a laptop against a finished sweep, or against
one still running: everything is read from what each trial has written so far.

It reads the records of an experiment folder (names in ``layout``, types in ``records``): the
plan in ``experiment.json`` (so trials that have not started yet still get a row), the base
figures in ``baseline.json``, and per trial ``status.json`` (the runtime's state, reason and wall
time), ``result.json`` (the final figures) and ``metrics.jsonl`` (one row per logged step).

:func:`write_leaderboard` adds ``leaderboard.{csv,json,md,png}`` and ``best -> <trial>``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from qlora_ray import layout, records, spread
from qlora_ray.files import write_text
from qlora_ray.records import TrialState
from qlora_ray.select import Selection, choose

# Trial states (``records.TrialState`` values), for readers comparing with a row's ``status``.
PENDING, RUNNING, FINISHED, FAILED, STOPPED = (s.value for s in TrialState if s != TrialState.PRUNED)
PRUNED = TrialState.PRUNED.value
# The leaderboard's order after the ranking.
_STATE_ORDER = {FINISHED: 0, RUNNING: 1, PRUNED: 2, STOPPED: 3, PENDING: 4, FAILED: 5}


@dataclass
class TrialRow:
    """One trial's line in the leaderboard (all metrics optional: a running trial has few)."""

    trial_id: str
    values: Dict[str, Any]
    status: str
    reason: Optional[str] = None
    step: Optional[int] = None
    total_steps: Optional[int] = None
    base_ppl: Optional[float] = None
    eval_ppl: Optional[float] = None
    ppl_change: Optional[float] = None
    train_loss: Optional[float] = None
    tokens_per_s: Optional[float] = None
    peak_mem_gb: Optional[float] = None
    train_wall_s: Optional[float] = None
    trial_wall_s: Optional[float] = None
    attempts: Optional[int] = None
    # trial_wall_s - train_wall_s split: worker_start_s, worker_setup_s, teardown_s (last run only).
    overhead_parts: Optional[Dict[str, float]] = None
    dir: Optional[str] = None
    losses: List[tuple] = field(default_factory=list, repr=False)
    # (step, periodic eval perplexity) of every eval step so far (eval.every_steps).
    evals: List[tuple] = field(default_factory=list, repr=False)
    pruned_step: Optional[int] = None  # where the sweep's scheduler stopped it
    best_step: Optional[int] = None    # eval.keep best: the step whose adapter the trial kept

    @property
    def state_text(self) -> str:
        """The status cell: ``pruned @ step k`` for a trial the scheduler stopped."""
        if self.status == PRUNED and self.pruned_step is not None:
            return f"pruned @ step {self.pruned_step}"
        if self.status == FINISHED and self.best_step is not None:
            return f"finished, best @ step {self.best_step}"
        return self.status
    control_base_ppl: Optional[float] = None
    control_ppl: Optional[float] = None
    control_change: Optional[float] = None
    base_ppl_unquantized: Optional[float] = None
    change_vs_unquantized: Optional[float] = None
    passed_over: Optional[str] = None  # why the selection did not pick this finished trial

    @property
    def overhead_s(self) -> Optional[float]:
        """Time the trial spent outside the training function (Ray start-up, restarts, sync)."""
        if self.trial_wall_s is None or self.train_wall_s is None:
            return None
        return self.trial_wall_s - self.train_wall_s


@dataclass
class Leaderboard:
    name: str
    sweep_keys: List[str]
    rows: List[TrialRow]
    base_ppl: Optional[float] = None
    spec_file: Optional[str] = None  # the spec last submitted (how to resume stopped trials)
    selection: Selection = field(default_factory=Selection)
    test: Optional[records.TestFigures] = None  # the best trial on the held-out test set

    @property
    def best(self) -> Optional[TrialRow]:
        """The finished trial the selection picks (``results`` in the spec; by default the lowest
        eval perplexity); trials it passes over carry the reason in ``passed_over``."""
        best, skipped = choose(self.rows, self.selection, FINISHED)
        for row in self.rows:
            row.passed_over = skipped.get(row.trial_id)
        return best

    @property
    def base_ppl_unquantized(self) -> Optional[float]:
        return next((r.base_ppl_unquantized for r in self.rows if _num(r.base_ppl_unquantized)), None)

    @property
    def failed(self) -> List[TrialRow]:
        return [r for r in self.rows if r.status == FAILED]

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for row in self.rows:
            out[row.status] = out.get(row.status, 0) + 1
        return out


# ---------------------------------------------------------------- reading

def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _with_tracking(reason: Optional[str], folder: Path) -> Optional[str]:
    """A trial's reason, plus what its experiment trackers could not log."""
    note = records.TrackingNote.read(folder / layout.TRACKING_FILE)
    if note is None or not note.errors:
        return reason
    return "; ".join(filter(None, [reason, "tracking failed: " + "; ".join(note.errors)]))


def read_trial(folder: Path, values: Optional[Dict[str, Any]] = None) -> TrialRow:
    """A leaderboard row from one trial folder (whatever it holds so far)."""
    status = records.TrialStatus.read(folder / layout.STATUS_FILE)
    result = records.TrialResult.read(folder / layout.RESULT_FILE)
    final = result.final if result else None
    steps = records.read_metrics(folder / layout.METRICS_FILE)
    last = steps[-1] if steps else None
    if status is not None:
        state = status.status
        if state == TrialState.RUNNING and final is not None:
            state = TrialState.FINISHED  # the final figures landed; the runtime has not stamped it yet
    else:
        state = TrialState.FINISHED if final else TrialState.RUNNING if steps else TrialState.PENDING
    latest = final or last
    evals = [(m.step, m.eval_ppl) for m in steps if _num(m.eval_ppl)]
    pruned = status is not None and state == TrialState.PRUNED
    row = TrialRow(
        trial_id=(status.trial_id if status else None) or folder.name,
        values=(status.values if status else None) or values or {},
        status=state.value,
        reason=_with_tracking(status.reason if status else None, folder),
        step=latest.step if latest else None,
        total_steps=(latest.total_steps if latest else None) or (status.total_steps if status else None),
        base_ppl=final.base_ppl if final else None,
        eval_ppl=final.eval_ppl if final else None,
        ppl_change=final.ppl_change if final else None,
        train_loss=final.train_loss if final else (last.loss if last else None),
        tokens_per_s=_latest(final, last, "tokens_per_s"),
        peak_mem_gb=_latest(final, last, "peak_mem_gb"),
        train_wall_s=final.wall_s if final else None,
        trial_wall_s=status.trial_wall_s if status else None,
        overhead_parts=status.overhead.fields() if status and status.overhead else None,
        attempts=status.attempts if status else None,
        dir=str(folder),
        losses=[(m.step, m.loss) for m in steps if _num(m.loss)],
        evals=evals,
        best_step=final.best_step if final else None,
        **_side_figures(final),
    )
    if pruned:
        # Its figure is the last periodic eval (on the periodic subset, if one is set).
        row.pruned_step = status.pruned_step
        row.step = status.pruned_step if status.pruned_step is not None else row.step
        row.eval_ppl = status.pruned_eval_ppl if _num(status.pruned_eval_ppl) else (evals[-1][1] if evals else None)
        row.reason = None
    return row


def _side_figures(final: Optional[records.FinalMetrics]) -> Dict[str, Any]:
    keys = ("control_base_ppl", "control_ppl", "control_change", "base_ppl_unquantized", "change_vs_unquantized")
    return {k: getattr(final, k, None) for k in keys} if final else {}


def _latest(final: Optional[records.FinalMetrics], last: Optional[records.StepMetrics], key: str) -> Any:
    for record in (final, last):
        value = getattr(record, key, None) if record is not None else None
        if value is not None:
            return value
    return None


def _is_trial_dir(path: Path) -> bool:
    return (path.is_dir() and not path.is_symlink() and path.name not in layout.NOT_TRIALS
            and not path.name.startswith(".")
            and any((path / f).exists() for f in layout.TRIAL_MARKERS))


def read_leaderboard(exp_dir: str | os.PathLike) -> Leaderboard:
    """Every trial of the plan (pending ones too) plus any other trial folder found, ranked."""
    exp = Path(exp_dir)
    if not exp.is_dir():
        raise FileNotFoundError(f"no experiment folder at {exp}")
    plan = records.ExperimentPlan.read(exp / layout.EXPERIMENT_FILE) or records.ExperimentPlan(name=exp.name)
    planned = {t.id: t.values for t in plan.trials}
    rows = {tid: read_trial(exp / tid, values) for tid, values in planned.items()}
    for folder in sorted(exp.iterdir()):
        if folder.name not in rows and _is_trial_dir(folder):
            rows[folder.name] = read_trial(folder)
    keys = list(plan.sweep_keys)
    for row in rows.values():
        keys += [k for k in row.values if k not in keys]
    baseline = records.Baseline.read(exp / layout.BASELINE_FILE)
    base = baseline.perplexity if baseline else None
    if not _num(base):
        base = next((r.base_ppl for r in rows.values() if _num(r.base_ppl)), None)
    for row in rows.values():
        if row.base_ppl is None and _num(base):
            row.base_ppl = base
    ranked = sorted(rows.values(), key=_rank_key)
    board = Leaderboard(name=plan.name or exp.name, sweep_keys=keys, rows=ranked,
                        base_ppl=base if _num(base) else None, selection=Selection.from_plan(plan.select),
                        spec_file=plan.spec_file or None,
                        test=records.TestFigures.read(exp / layout.TEST_FILE))
    board.best  # fills each row's passed_over
    # A trial the selection passed over ranks after the finished trials it may pick from.
    board.rows.sort(key=lambda r: (_STATE_ORDER.get(r.status, 5), r.passed_over is not None))
    return board


def _rank_key(row: TrialRow) -> tuple:
    ppl = row.eval_ppl if _num(row.eval_ppl) else math.inf
    return (_STATE_ORDER.get(row.status, 5), ppl, -(row.step or 0), row.trial_id)


# ---------------------------------------------------------------- formatting

COLUMNS = [  # (key, header, format)
    ("base_ppl", "base ppl", "{:.2f}"),
    ("eval_ppl", "eval ppl", "{:.2f}"),
    ("ppl_change", "change", "{:+.1%}"),
    # The same tuned model against the base unquantized: what the user would otherwise run.
    ("change_vs_unquantized", "change vs unquantized", "{:+.1%}"),
    ("control_base_ppl", "control base", "{:.2f}"),
    ("control_ppl", "control tuned", "{:.2f}"),
    ("control_change", "control change", "{:+.1%}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("peak_mem_gb", "peak GiB", "{:.2f}"),
    ("trial_wall_s", "wall s", "{:.0f}"),
    # Trial wall (as Ray ran it) minus fit()'s own wall: Ray Train start-up, worker, syncs.
    ("overhead_s", "overhead s", "{:.0f}"),
]


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _fmt(value: Any, spec: str = "{}") -> str:
    if value is None:
        return ""
    if _num(value):
        try:
            return spec.format(value)
        except (ValueError, TypeError):
            return str(value)
    return str(value)


def _fmt_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def progress(row: TrialRow) -> str:
    """``12/60`` style step counter (empty before the first report)."""
    if row.step is None:
        return ""
    return f"{row.step}/{row.total_steps}" if row.total_steps else str(row.step)


# Shown only when some trial has them (a spec without a control set or with an unquantized base).
OPTIONAL_COLUMNS = ("change_vs_unquantized", "control_base_ppl", "control_ppl", "control_change")


def _columns(board: Leaderboard) -> List[tuple]:
    return [c for c in COLUMNS
            if c[0] not in OPTIONAL_COLUMNS or any(getattr(r, c[0]) is not None for r in board.rows)]


def table_rows(board: Leaderboard) -> tuple[List[str], List[List[str]]]:
    """Headers and formatted cells, shared by the markdown file and the terminal table."""
    columns = _columns(board)
    headers = ["#", "trial", *(_short(k) for k in board.sweep_keys), *(h for _, h, _ in columns),
               "status", "step"]
    out = []
    for i, row in enumerate(board.rows, 1):
        status = row.state_text if not row.reason else f"{row.state_text}: {row.reason}"
        if row.passed_over:
            status += " (passed over)"
        out.append([str(i), row.trial_id, *(_fmt_value(row.values.get(k, "")) for k in board.sweep_keys),
                    *(_fmt(getattr(row, key), spec) for key, _, spec in columns), status, progress(row)])
    return headers, out


def to_records(board: Leaderboard) -> List[Dict[str, Any]]:
    """One flat dict per trial (the CSV and JSON rows)."""
    records = []
    for i, row in enumerate(board.rows, 1):
        data = asdict(row)
        data.pop("losses")
        data.pop("evals")
        data.pop("values")
        rec = {"place": i, "trial_id": row.trial_id,
               **{k: row.values.get(k) for k in board.sweep_keys}}
        rec.update({k: v for k, v in data.items() if k != "trial_id"})
        rec["overhead_s"] = row.overhead_s
        for part, seconds in (rec.pop("overhead_parts") or {}).items():
            rec[f"overhead_{part}"] = seconds
        records.append(rec)
    return records


def resume_hint(board: Leaderboard, stopped: int) -> str:
    """How stopped trials go on: the same submit again resumes each from its last checkpoint."""
    spec = f"`qlora-ray submit {board.spec_file}`" if board.spec_file else "the same `qlora-ray submit`"
    return (f"{stopped} trial(s) stopped before the end (interrupted): run {spec} again to resume them "
            "from their last checkpoints (`--fresh` starts the experiment over).")


def to_markdown(board: Leaderboard) -> str:
    headers, rows = table_rows(board)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(board.counts().items(), key=lambda kv: _STATE_ORDER.get(kv[0], 5)))

    def esc(cell: str) -> str:
        return cell.replace("|", "\\|").replace("\n", " ")

    lines = [f"# {board.name}: {len(board.rows)} trials ({counts})", ""]
    if board.base_ppl is not None:
        lines += [f"Base model eval perplexity: {board.base_ppl:.2f}", ""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    best = board.best
    if board.base_ppl_unquantized is not None and board.base_ppl is not None:
        lines += ["", f"Quantization cost: the base model unquantized has eval perplexity "
                      f"{board.base_ppl_unquantized:.2f}, quantized {board.base_ppl:.2f} "
                      f"({board.base_ppl / board.base_ppl_unquantized - 1:+.1%}); `change vs unquantized` "
                      "compares each tuned model with the unquantized base."]
    if best is not None:
        lines += ["", f"Best: `{best.trial_id}` (eval ppl {best.eval_ppl:.2f}); adapter in `{layout.BEST_LINK}/{layout.ADAPTER_DIR}/`."]
    lines += _selection_lines(board, best)
    lines += _test_lines(board, best)
    lines += spread.to_markdown(spread.configurations(board.rows), _short)
    stopped = board.counts().get(STOPPED, 0)
    if stopped:
        lines += ["", resume_hint(board, stopped)]
    if board.failed:
        lines += ["", "## Failed trials", ""]
        lines += [f"- `{r.trial_id}`: {r.reason or 'no reason recorded'}" for r in board.failed]
    return "\n".join(lines) + "\n"


def _selection_lines(board: Leaderboard, best: Optional[TrialRow]) -> List[str]:
    passed = [r for r in board.rows if r.passed_over]
    if not passed and board.selection == Selection():
        return []
    lines = ["", f"Selection: {board.selection.describe()}."]
    if best is None and passed:
        lines += ["No finished trial passed the selection, so there is no best trial."]
    if passed:
        lines += ["", "## Passed over", ""]
        lines += [f"- `{r.trial_id}`: {r.passed_over}" for r in passed]
    return lines


def _test_lines(board: Leaderboard, best: Optional[TrialRow]) -> List[str]:
    t = board.test
    if t is None:
        return []
    lines = ["", "## Test set", "",
             "Held out from training and selection; measured for the selected trial only.", ""]
    if best is None or t.trial_id != best.trial_id:
        return lines + [f"(measured for `{t.trial_id}`, which is no longer the best trial; re-run submit to measure the new best)"]
    return lines + ["| trial | data | base ppl | tuned ppl | change | target tokens |", "|---|---|---|---|---|---|",
                    f"| {t.trial_id} | {t.data} | {_fmt(t.base_ppl, '{:.2f}')} | {_fmt(t.tuned_ppl, '{:.2f}')} | "
                    f"{_fmt(t.change, '{:+.1%}')} | {t.target_tokens:,} |"]


def to_csv(board: Leaderboard) -> str:
    records = to_records(board)
    buf = io.StringIO()
    if records:
        # Union of keys in first-seen order: rows differ (a running trial has no overhead split).
        fields = list(dict.fromkeys(key for rec in records for key in rec))
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
    return buf.getvalue()


def to_json(board: Leaderboard) -> Dict[str, Any]:
    best = board.best
    return {records.SCHEMA_KEY: records.SCHEMA_VERSION, "name": board.name, "sweep_keys": board.sweep_keys, "base_ppl": board.base_ppl,
            "best": best.trial_id if best else None, "counts": board.counts(),
            "trials": to_records(board), "base_ppl_unquantized": board.base_ppl_unquantized,
            "configurations": [g.fields() for g in spread.configurations(board.rows)],
            "selection": {"metric": board.selection.metric,
                          "max_control_increase": board.selection.max_control_increase},
            "test": board.test.fields() if board.test else None}


# ---------------------------------------------------------------- the plot

def plot(board: Leaderboard, path: Path) -> Path:
    """:func:`figure` saved to ``path``."""
    figure(board).savefig(path, dpi=110)
    return path


def figure(board: Leaderboard):
    """Eval perplexity over the sweep (heatmap for two swept keys, lines otherwise), the
    training-loss curves of every trial and, when trials evaluated while training
    (eval.every_steps), their eval-perplexity curves, side by side."""
    # The object-oriented API with the Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = any(r.evals for r in board.rows)
    with_control = any(_num(r.control_change) for r in board.rows)
    panels = 2 + curves + with_control
    fig = Figure(figsize=(6 * panels, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    ax_ppl, ax_loss = axes[0], axes[1]
    extra = list(axes[2:])
    if curves:
        _plot_eval_curves(board, extra.pop(0))
    if with_control:
        _plot_control(board, extra.pop(0))
    _plot_ppl(board, ax_ppl)
    for row in board.rows:
        if row.losses:
            steps, losses = zip(*row.losses)
            ax_loss.plot(steps, losses, label=_label(board, row), linewidth=1.2)
    ax_loss.set_title("training loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    if any(r.losses for r in board.rows):
        ax_loss.legend(fontsize=7, loc="upper right")
    else:
        ax_loss.text(0.5, 0.5, "no loss reported yet", ha="center", va="center", transform=ax_loss.transAxes)
    fig.suptitle(f"{board.name}: eval perplexity" + (f" (base {board.base_ppl:.2f})" if board.base_ppl else ""))
    return fig


def _plot_eval_curves(board: Leaderboard, ax) -> None:
    """One line per trial: its periodic eval perplexity over the steps; a pruned trial ends in an x."""
    for row in board.rows:
        if not row.evals:
            continue
        steps, ppls = zip(*row.evals)
        pruned = row.status == PRUNED
        ax.plot(steps, ppls, label=_label(board, row) + (" (pruned)" if pruned else ""), linewidth=1.2,
                linestyle="--" if pruned else "-", marker="x" if pruned else None, markevery=[len(steps) - 1])
    if board.base_ppl is not None:
        ax.axhline(board.base_ppl, color="grey", linestyle=":", linewidth=1)
    ax.set_title("eval perplexity while training")
    ax.set_xlabel("step")
    ax.set_ylabel("eval perplexity")
    ax.legend(fontsize=7, loc="upper right")


def _plot_control(board: Leaderboard, ax) -> None:
    """Eval change beside control change per trial: a gain bought by forgetting stands out."""
    rows = [r for r in board.rows if _num(r.control_change) and _num(r.ppl_change)]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [100 * r.ppl_change for r in rows], width=0.4, label="eval change")
    ax.bar([x + 0.2 for x in xs], [100 * r.control_change for r in rows], width=0.4, label="control change")
    limit = board.selection.max_control_increase
    if limit is not None:
        ax.axhline(100 * limit, color="red", linestyle="--", linewidth=1, label="control limit")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(list(xs), [_label(board, r) for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("perplexity change vs base (%)")
    ax.set_title("eval vs control change (lower is better)")
    ax.legend(fontsize=7)


def _label(board: Leaderboard, row: TrialRow) -> str:
    if not board.sweep_keys:
        return row.trial_id
    return " ".join(f"{_short(k)}={_fmt_value(row.values.get(k))}" for k in board.sweep_keys)


def _plot_ppl(board: Leaderboard, ax) -> None:
    # A pruned trial's figure is a periodic one (maybe on a subset): its curve shows it instead.
    done = [r for r in board.rows if _num(r.eval_ppl) and r.status != PRUNED]
    keys = board.sweep_keys
    ax.set_title("eval perplexity (lower is better)")
    if not done:
        ax.text(0.5, 0.5, "no trial has finished yet", ha="center", va="center", transform=ax.transAxes)
        return
    if len(keys) == 2:
        xs = sorted({r.values.get(keys[1]) for r in board.rows}, key=_sort_value)
        ys = sorted({r.values.get(keys[0]) for r in board.rows}, key=_sort_value)
        grid = [[math.nan] * len(xs) for _ in ys]
        for r in done:
            grid[ys.index(r.values.get(keys[0]))][xs.index(r.values.get(keys[1]))] = r.eval_ppl
        image = ax.imshow(grid, cmap="viridis_r", aspect="auto")
        ax.figure.colorbar(image, ax=ax, label="eval perplexity")
        ax.set_xticks(range(len(xs)), [_fmt_value(x) for x in xs])
        ax.set_yticks(range(len(ys)), [_fmt_value(y) for y in ys])
        ax.set_xlabel(keys[1])
        ax.set_ylabel(keys[0])
        finite = [v for line in grid for v in line if not math.isnan(v)]
        middle = (min(finite) + max(finite)) / 2
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                text = "—" if math.isnan(value) else f"{value:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="black" if math.isnan(value) or value < middle else "white")
        return
    if keys:
        # x: the first swept key; one line per combination of the others.
        groups: Dict[str, List[TrialRow]] = {}
        for r in done:
            name = " ".join(f"{_short(k)}={_fmt_value(r.values.get(k))}" for k in keys[1:]) or "eval"
            groups.setdefault(name, []).append(r)
        xs = sorted({r.values.get(keys[0]) for r in done}, key=_sort_value)
        for name, rows in groups.items():
            rows.sort(key=lambda r: _sort_value(r.values.get(keys[0])))
            ax.plot([xs.index(r.values.get(keys[0])) for r in rows], [r.eval_ppl for r in rows],
                    marker="o", label=name)
        ax.set_xticks(range(len(xs)), [_fmt_value(x) for x in xs])
        ax.set_xlabel(keys[0])
        ax.legend(fontsize=7)
    else:
        ax.bar([r.trial_id for r in done], [r.eval_ppl for r in done])
    if board.base_ppl is not None:
        ax.axhline(board.base_ppl, color="grey", linestyle="--", linewidth=1, label="base")
    ax.set_ylabel("eval perplexity")


def _sort_value(value: Any) -> tuple:
    return (0, value, "") if _num(value) else (1, 0, str(value))


# ---------------------------------------------------------------- writing

def write_leaderboard(exp_dir: str | os.PathLike, with_plot: bool = True) -> Leaderboard:
    """Write ``leaderboard.{csv,json,md}`` (and ``.png``) and point ``best`` at the best trial."""
    exp = Path(exp_dir)
    board = read_leaderboard(exp)
    write_text(exp / layout.leaderboard_file("md"), to_markdown(board))
    write_text(exp / layout.leaderboard_file("csv"), to_csv(board))
    write_text(exp / layout.leaderboard_file("json"), json.dumps(to_json(board), indent=2, default=str) + "\n")
    if with_plot:
        final = exp / layout.leaderboard_file("png")
        os.replace(plot(board, exp / f".{layout.LEADERBOARD}.{os.getpid()}.png"), final)
    link_best(exp, board)
    return board


def link_best(exp: Path, board: Leaderboard) -> Optional[Path]:
    """``best -> <trial id>`` (relative, so the folder can move); removed when nothing finished."""
    link = exp / layout.BEST_LINK
    best = board.best
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        return None  # a real file or folder by that name is the user's; leave it alone
    if best is None:
        return None
    link.symlink_to(best.trial_id, target_is_directory=True)
    return link
