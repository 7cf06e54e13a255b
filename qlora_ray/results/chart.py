"""The leaderboard as a figure: eval perplexity over the sweep, training-loss curves and, when
trials evaluated while training or measured a control set, those beside them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

from qlora_ray.results.board import PRUNED, Leaderboard, TrialRow, is_number
from qlora_ray.results.render import format_value, short_key


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
    with_control = any(is_number(r.control_change) for r in board.rows)
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
    rows = [r for r in board.rows if is_number(r.control_change) and is_number(r.ppl_change)]
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
    return " ".join(f"{short_key(k)}={format_value(row.values.get(k))}" for k in board.sweep_keys)


def _plot_ppl(board: Leaderboard, ax) -> None:
    # A pruned trial's figure is a periodic one (maybe on a subset): its curve shows it instead.
    done = [r for r in board.rows if is_number(r.eval_ppl) and r.status != PRUNED]
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
        ax.set_xticks(range(len(xs)), [format_value(x) for x in xs])
        ax.set_yticks(range(len(ys)), [format_value(y) for y in ys])
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
            name = " ".join(f"{short_key(k)}={format_value(r.values.get(k))}" for k in keys[1:]) or "eval"
            groups.setdefault(name, []).append(r)
        xs = sorted({r.values.get(keys[0]) for r in done}, key=_sort_value)
        for name, rows in groups.items():
            rows.sort(key=lambda r: _sort_value(r.values.get(keys[0])))
            ax.plot([xs.index(r.values.get(keys[0])) for r in rows], [r.eval_ppl for r in rows],
                    marker="o", label=name)
        ax.set_xticks(range(len(xs)), [format_value(x) for x in xs])
        ax.set_xlabel(keys[0])
        ax.legend(fontsize=7)
    else:
        ax.bar([r.trial_id for r in done], [r.eval_ppl for r in done])
    if board.base_ppl is not None:
        ax.axhline(board.base_ppl, color="grey", linestyle="--", linewidth=1, label="base")
    ax.set_ylabel("eval perplexity")


def _sort_value(value: Any) -> tuple:
    return (0, value, "") if is_number(value) else (1, 0, str(value))
