"""The leaderboard as text: the table (shared by the markdown file and the terminal), markdown,
CSV and JSON."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from typing import Any, Dict, List, Optional

from qlora_ray import layout, records, spread
from qlora_ray.results.board import STATE_ORDER, STOPPED, Leaderboard, TrialRow, is_number
from qlora_ray.select import Selection


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


def short_key(key: str) -> str:
    """A swept key's last part (``lora.r`` -> ``r``), for headers and labels."""
    return key.rsplit(".", 1)[-1]


def _fmt(value: Any, spec: str = "{}") -> str:
    if value is None:
        return ""
    if is_number(value):
        try:
            return spec.format(value)
        except (ValueError, TypeError):
            return str(value)
    return str(value)


def format_value(value: Any) -> str:
    """A swept value as shown in a cell or label (floats in their shortest form)."""
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
    headers = ["#", "trial", *(short_key(k) for k in board.sweep_keys), *(h for _, h, _ in columns),
               "status", "step"]
    out = []
    for i, row in enumerate(board.rows, 1):
        status = row.state_text if not row.reason else f"{row.state_text}: {row.reason}"
        if row.passed_over:
            status += " (passed over)"
        out.append([str(i), row.trial_id, *(format_value(row.values.get(k, "")) for k in board.sweep_keys),
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
    counts = ", ".join(f"{n} {s}" for s, n in sorted(board.counts().items(), key=lambda kv: STATE_ORDER.get(kv[0], 5)))

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
    lines += spread.to_markdown(spread.configurations(board.rows), short_key)
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
