"""The leaderboard from synthetic trial folders: ranking, failed and running trials, the files
written (md/csv/json/png) and the ``best`` link. Pure file work: no Ray, no torch."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qlora_ray import results
from qlora_ray.cli import app

KEYS = ["lora.r", "train.lr"]


def _trial(exp: Path, tid: str, values: dict, status: str | None, steps: int = 4, final: dict | None = None,
           reason: str | None = None, wall: float | None = None, torn: bool = False) -> Path:
    folder = exp / tid
    folder.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 3.0 - 0.2 * s - values.get("lora.r", 0) / 100, "tokens_per_s": 900.0,
                         "total_steps": 4}) for s in range(1, steps + 1)]
    if final:
        (folder / "result.json").write_text(json.dumps({"schema": 1, "final": {"step": steps, **final}}))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"step": 9, "lo'  # a trial writing right now
    (folder / "metrics.jsonl").write_text(text)
    if status is not None:
        (folder / "status.json").write_text(json.dumps({
            "trial_id": tid, "values": values, "status": status, "reason": reason,
            "trial_wall_s": wall}))
    return folder


def _final(ppl: float, base: float = 40.0) -> dict:
    return {"eval_ppl": ppl, "base_ppl": base, "ppl_change": ppl / base - 1, "train_loss": 2.1,
            "tokens_per_s": 1000.0, "peak_mem_gb": 1.5, "wall_s": 20.0, "train_s": 15.0}


@pytest.fixture
def exp(tmp_path) -> Path:
    """Four planned trials: two finished, one failed, one still running; plus a pending one."""
    exp = tmp_path / "runs" / "tiny"
    exp.mkdir(parents=True)
    ids = {(r, lr): f"tiny-r{r}_lr{lr:.0e}".replace("e-0", "e-") for r in (2, 4) for lr in (1e-3, 5e-3)}
    plan = [{"id": tid, "values": {"lora.r": r, "train.lr": lr}} for (r, lr), tid in ids.items()]
    plan.append({"id": "tiny-r8_lr1e-3", "values": {"lora.r": 8, "train.lr": 1e-3}})
    (exp / "experiment.json").write_text(json.dumps({"name": "tiny", "sweep_keys": KEYS, "trials": plan}))
    (exp / "baseline.json").write_text(json.dumps({"perplexity": 40.0, "target_tokens": 100}))
    _trial(exp, ids[2, 1e-3], {"lora.r": 2, "train.lr": 1e-3}, "finished", final=_final(30.0), wall=35.0)
    _trial(exp, ids[4, 5e-3], {"lora.r": 4, "train.lr": 5e-3}, "finished", final=_final(25.0), wall=33.0)
    _trial(exp, ids[2, 5e-3], {"lora.r": 2, "train.lr": 5e-3}, "failed", steps=2,
           reason="RuntimeError: CUDA out of memory")
    _trial(exp, ids[4, 1e-3], {"lora.r": 4, "train.lr": 1e-3}, "running", steps=3, torn=True)
    return exp


def test_ranking_failed_running_and_pending(exp):
    board = results.read_leaderboard(exp)
    assert [r.status for r in board.rows] == ["finished", "finished", "running", "pending", "failed"]
    assert [r.eval_ppl for r in board.rows[:2]] == [25.0, 30.0]
    assert board.best.trial_id == "tiny-r4_lr5e-3"
    running = board.rows[2]
    assert (running.step, running.total_steps, running.eval_ppl) == (3, 4, None)  # torn line skipped
    assert running.train_loss == pytest.approx(3.0 - 0.6 - 0.04)  # latest reported loss
    assert board.rows[3].values == {"lora.r": 8, "train.lr": 1e-3}  # planned, not started: still listed
    assert board.failed[0].reason == "RuntimeError: CUDA out of memory"
    assert all(r.base_ppl == 40.0 for r in board.rows)
    assert board.rows[0].overhead_s == pytest.approx(13.0)  # trial wall 33 - training wall 20


def test_files_written_and_best_link(exp):
    board = results.write_leaderboard(exp)
    assert (exp / "best").is_symlink() and (exp / "best").resolve() == (exp / "tiny-r4_lr5e-3").resolve()
    png = (exp / "leaderboard.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    md = (exp / "leaderboard.md").read_text()
    assert md.startswith("# tiny: 5 trials (2 finished, 1 running, 1 pending, 1 failed)")
    assert "| 1 | tiny-r4_lr5e-3 | 4 | 0.005 | 40.00 | 25.00 | -37.5% |" in md
    assert "## Failed trials" in md and "- `tiny-r2_lr5e-3`: RuntimeError: CUDA out of memory" in md
    assert "Best: `tiny-r4_lr5e-3`" in md
    # Ray's overhead per trial (trial wall 33 s - fit's wall 20 s) is a column of the table.
    assert "| wall s | overhead s | status |" in md
    assert "| 1.50 | 33 | 13 | finished |" in md
    assert "| 1.50 | 35 | 15 | finished |" in md

    rows = list(csv.DictReader(io.StringIO((exp / "leaderboard.csv").read_text())))
    assert [r["trial_id"] for r in rows] == [r.trial_id for r in board.rows]
    assert rows[0]["lora.r"] == "4" and float(rows[0]["train.lr"]) == 5e-3
    assert float(rows[0]["eval_ppl"]) == 25.0 and rows[0]["status"] == "finished"
    assert float(rows[0]["overhead_s"]) == pytest.approx(13.0)

    data = json.loads((exp / "leaderboard.json").read_text())
    assert data["best"] == "tiny-r4_lr5e-3" and data["base_ppl"] == 40.0
    assert data["counts"] == {"finished": 2, "running": 1, "pending": 1, "failed": 1}
    failed = [t for t in data["trials"] if t["status"] == "failed"][0]
    assert failed["reason"] == "RuntimeError: CUDA out of memory"


def test_best_link_moves_and_disappears(exp):
    results.write_leaderboard(exp, with_plot=False)
    better = _trial(exp, "tiny-r8_lr1e-3", {"lora.r": 8, "train.lr": 1e-3}, "finished", final=_final(20.0))
    results.write_leaderboard(exp, with_plot=False)
    assert (exp / "best").resolve() == better.resolve()
    (better / "status.json").write_text(json.dumps({"status": "failed", "reason": "x"}))
    results.write_leaderboard(exp, with_plot=False)
    assert (exp / "best").resolve() == (exp / "tiny-r4_lr5e-3").resolve()


def test_sweep_in_progress_without_status_files(tmp_path):
    """A trial folder with only metrics (no status.json yet), one final row, no plan file."""
    exp = tmp_path / "exp"
    _trial(exp, "a", {}, None, steps=2)
    _trial(exp, "b", {}, None, steps=4, final=_final(12.0))
    (exp / "_ray").mkdir()  # Ray's state is never a trial
    board = results.write_leaderboard(exp)
    assert [(r.trial_id, r.status) for r in board.rows] == [("b", "finished"), ("a", "running")]
    assert board.base_ppl == 40.0  # from the trial's own final report when baseline.json is missing
    assert (exp / "leaderboard.png").exists() and (exp / "best").resolve().name == "b"


def test_no_finished_trial_yet(tmp_path):
    exp = tmp_path / "exp"
    _trial(exp, "a", {"lora.r": 2}, "running", steps=1)
    board = results.write_leaderboard(exp)
    assert board.best is None and not (exp / "best").exists()
    assert (exp / "leaderboard.png").exists()


def test_single_key_sweep_plot_and_no_sweep(tmp_path):
    for keys in (["lora.r"], []):
        exp = tmp_path / f"exp{len(keys)}"
        for i, r in enumerate((2, 4, 8)):
            values = {"lora.r": r} if keys else {}
            _trial(exp, f"t{i}", values, "finished", final=_final(30.0 - i))
        board = results.write_leaderboard(exp)
        assert board.sweep_keys == keys and board.best.trial_id == "t2"
        assert (exp / "leaderboard.png").stat().st_size > 5_000


def test_results_command_prints_table(exp):
    out = CliRunner().invoke(app, ["results", str(exp)], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    assert "tiny-r4_lr5e-3" in out.output and "25.00" in out.output
    # Not a terminal here, so the table prints as markdown (as in a Ray job's log).
    assert "- `tiny-r2_lr5e-3`: RuntimeError: CUDA out of memory" in out.output
    assert (exp / "leaderboard.md").exists()
    as_json = CliRunner().invoke(app, ["results", str(exp), "--json", "--no-write"])
    assert json.loads(as_json.output)["best"] == "tiny-r4_lr5e-3"


def test_results_command_unknown_experiment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(app, ["results", "nope"])
    assert out.exit_code == 2 and "no experiment 'nope'" in out.output


def test_status_and_logs_of_a_foreground_experiment(exp):
    """No job.json (not --detach): status shows each trial from its files; logs says where Ray's logs are."""
    plan = json.loads((exp / "experiment.json").read_text())
    (exp / "experiment.json").write_text(json.dumps({**plan, "ray_logs": "/tmp/ray/session_x/logs"}))
    status = CliRunner().invoke(app, ["status", str(exp)], env={"COLUMNS": "200"})
    assert status.exit_code == 0, status.output
    assert "not a detached job" in status.output
    assert "tiny-r4_lr1e-3" in status.output and "3/4" in status.output
    logs = CliRunner().invoke(app, ["logs", str(exp)], env={"COLUMNS": "200"})
    assert logs.exit_code == 0, logs.output
    assert "/tmp/ray/session_x/logs" in logs.output
    assert "tiny-r2_lr5e-3: failed: RuntimeError: CUDA out of memory" in logs.output


def test_overhead_split_reaches_csv_and_json_even_when_only_some_trials_have_it(exp):
    """status.json's overhead split (Ray start, worker setup, teardown) becomes flat columns; rows
    without one (running, pending, older runs) leave them empty instead of breaking the CSV."""
    status_path = exp / "tiny-r2_lr1e-3" / "status.json"
    status = json.loads(status_path.read_text())
    status["overhead"] = {"worker_start_s": 9.5, "worker_setup_s": 4.0, "teardown_s": 1.5}
    status_path.write_text(json.dumps(status))
    results.write_leaderboard(exp, with_plot=False)
    rows = {r["trial_id"]: r for r in csv.DictReader(io.StringIO((exp / "leaderboard.csv").read_text()))}
    split = rows["tiny-r2_lr1e-3"]
    assert (float(split["overhead_worker_start_s"]), float(split["overhead_worker_setup_s"]),
            float(split["overhead_teardown_s"])) == (9.5, 4.0, 1.5)
    assert rows["tiny-r4_lr5e-3"]["overhead_worker_start_s"] == ""  # first row has none: still a column
    data = json.loads((exp / "leaderboard.json").read_text())
    first = next(t for t in data["trials"] if t["trial_id"] == "tiny-r2_lr1e-3")
    assert first["overhead_teardown_s"] == 1.5 and "overhead_parts" not in first
