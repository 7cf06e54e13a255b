"""``qlora-ray submit | status | logs | results``: run a spec's sweep on Ray and read its results.

``qlora_ray.runtime`` (which imports Ray) is imported inside the verbs that need it; results,
status and logs read an experiment (a folder or a URI) through ``qlora_ray.storage``, without Ray.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from qlora_ray import layout, results, storage
from qlora_ray.cli.app import app, console, err_console, say, user_errors
from qlora_ray.cli.spec_cmds import split_args
from qlora_ray.errors import UserError
from qlora_ray.records import ExperimentPlan, JobRecord
from qlora_ray.spec import load_spec, project_root
from qlora_ray.storage import is_uri


def _one_spec(args: List[str]) -> tuple[Path, List[str]]:
    specs, overrides = split_args(args)
    if len(specs) != 1:
        raise UserError(f"submit takes one spec file, got {len(specs)}: {', '.join(map(str, specs))}")
    return specs[0], overrides


@app.command()
@user_errors
def submit(
    args: List[str] = typer.Argument(..., metavar="SPEC [KEY=VALUE...]",
                                     help="The job spec, then dotted overrides (train.lr=1e-4)."),
    address: Optional[str] = typer.Option(
        None, "--address", help="A running Ray cluster: auto, host:port, or ray://host:port "
        "(with --detach also http://host:8265). Default: $RAY_ADDRESS, else a new local Ray in this process."),
    detach: bool = typer.Option(False, "--detach", help="Submit as a Ray Job and return; follow with "
                                "`qlora-ray status NAME` and `qlora-ray logs NAME`."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over: move the old experiment folder to "
                               "<name>.old-<time> (nothing is deleted) instead of resuming it."),
    dashboard_host: str = typer.Option("127.0.0.1", "--dashboard-host", help="Interface the local Ray "
                                       "dashboard listens on. 0.0.0.0 exposes it to the network."),
    dashboard: bool = typer.Option(True, "--dashboard/--no-dashboard", help="Start the local Ray dashboard."),
) -> None:
    """Run a spec's trial grid on Ray (resuming what an earlier submit left) and print the leaderboard.

    Re-submitting the same spec skips finished trials and continues unfinished ones from their
    last checkpoint. Results: <output.dir>/<name>/leaderboard.{md,csv,json,png} and best/.

    Examples:
      qlora-ray submit jobs/hinglish_smoke.yaml
      qlora-ray submit jobs/hinglish_sweep.yaml --address auto train.epochs=1
      qlora-ray submit jobs/hinglish_sweep.yaml --address ray://head:10001 --detach
    """
    spec_path, overrides = _one_spec(args)
    from qlora_ray import runtime
    from qlora_ray.mirror import check_hub, hub_experiment, is_hub

    spec = load_spec(spec_path, overrides)
    if detach:
        if is_hub(spec.output.dir):  # the job mirrors it on the cluster, which needs HF_TOKEN too
            check_hub(spec.output.dir)
        record = runtime.submit_detached(spec_path, overrides, console, address=address, fresh=fresh)
        name = record.name
        console.print(f"submitted job [bold]{record.job_id}[/] to {record.address}", soft_wrap=True)
        console.print(f"  follow it:  qlora-ray status {name}  |  qlora-ray logs {name} --follow", soft_wrap=True)
        console.print(f"  results:    qlora-ray results {name}  (job record: {record.experiment}/{layout.JOB_FILE})",
                      soft_wrap=True, highlight=False)
        return
    with hub_experiment(spec.output.dir, spec.name, fresh, say) as staging:
        # An hf:// output.dir: the sweep runs in the local mirror, pushed to the Hub as it goes.
        outcome = runtime.submit(spec_path, [*overrides, *([f"output.dir={staging}"] if staging else [])], console,
                                 runtime.ConnectOptions(address=address, dashboard=dashboard,
                                                        dashboard_host=dashboard_host), fresh=fresh)
    _print_board(outcome.board, outcome.exp)
    if outcome.out_of_time:
        # Exit 3: not a failure, a session ending; the same command (without --fresh) resumes.
        again = shlex.join(["qlora-ray", *(a for a in sys.argv[1:] if a != "--fresh")])
        err_console.print(f"time budget spent: {len(outcome.out_of_time)} trial(s) saved a checkpoint and "
                          f"stopped. Resume with:\n  {again}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(3)
    # Exit 0 only when every trial of this spec finished; else 1, naming each that did not and why.
    unfinished = outcome.unfinished
    if unfinished:
        err_console.print(f"{len(unfinished)} of {len(outcome.planned)} trial(s) did not finish: " + "; ".join(
            f"{row.trial_id} {row.status}: {row.reason or 'no reason recorded'}" for row in unfinished),
            markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command("results")
@user_errors
def results_cmd(
    experiment: str = typer.Argument(..., metavar="NAME_OR_DIR",
                                     help="Experiment name (runs/<name>), folder, storage URI, or spec file."),
    as_json: bool = typer.Option(False, "--json", help="Print the leaderboard as JSON."),
    write: bool = typer.Option(True, "--write/--no-write", help="Also (re)write leaderboard.* and best/."),
) -> None:
    """Print an experiment's leaderboard; works while the sweep is still running.

    Examples:
      qlora-ray results hinglish_sweep
      qlora-ray results runs/hinglish_sweep --json
    """
    exp = find_experiment(experiment)
    board = _leaderboard(exp, write)
    if as_json:
        console.print_json(json.dumps(results.to_json(board), default=str))
        return
    _print_board(board, exp)


@app.command()
@user_errors
def status(
    experiment: str = typer.Argument(..., metavar="NAME_OR_DIR", help="Experiment name, folder, URI or spec file."),
) -> None:
    """Show a detached job's state (Ray Jobs API) and each trial's progress.

    Example: qlora-ray status hinglish_sweep
    """
    exp = find_experiment(experiment)
    record = storage.read_record(exp, JobRecord, layout.JOB_FILE)
    if record:
        from qlora_ray import runtime

        try:
            info = runtime.job_status(record)
        except UserError as e:
            err_console.print(f"[yellow]job {record.job_id}: cannot reach the cluster[/]: {e}")
        else:
            console.print(f"job [bold]{info.job_id}[/]: {info.status}  ({info.address})")
            if info.message:
                console.print(f"  {info.message}", markup=False, highlight=False)
    else:
        console.print(f"{exp}: not a detached job (no job.json); trial states from its files:", highlight=False)
    board = _leaderboard(exp, write=False)
    table = Table(title=f"{board.name}: {_counts(board)}", title_justify="left")
    for col in ("trial", "state", "step", "loss", "eval ppl", "note"):
        table.add_column(col, justify="left" if col in ("trial", "state", "note") else "right")
    for row in board.rows:
        loss = f"{row.train_loss:.4f}" if isinstance(row.train_loss, (int, float)) else ""
        ppl = f"{row.eval_ppl:.2f}" if isinstance(row.eval_ppl, (int, float)) else ""
        table.add_row(row.trial_id, row.status, results.progress(row), loss, ppl, row.reason or "")
    console.print(table)


@app.command()
@user_errors
def logs(
    experiment: str = typer.Argument(..., metavar="NAME_OR_DIR", help="Experiment name, folder, URI or spec file."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
) -> None:
    """Print a detached job's driver log (Ray Jobs API); for a foreground run, where Ray's logs are.

    Example: qlora-ray logs hinglish_sweep --follow
    """
    exp = find_experiment(experiment)
    record = storage.read_record(exp, JobRecord, layout.JOB_FILE)
    if record:
        from qlora_ray import runtime

        runtime.job_logs(record, follow=follow, write=lambda text: console.out(text, end="", highlight=False))
        return
    plan = storage.read_record(exp, ExperimentPlan, layout.EXPERIMENT_FILE) or ExperimentPlan(name="")
    console.print(f"{exp} ran in the foreground (no job.json), so there is no job log to print.", highlight=False)
    if plan.ray_logs:
        console.print(f"Ray's logs of that run: {plan.ray_logs} (worker output: worker-*.out; "
                      "Ray Train: train/)", highlight=False)
    board = _leaderboard(exp, write=False)
    for row in board.rows:
        if row.reason:
            console.print(f"{row.trial_id}: {row.status}: {row.reason}", markup=False, highlight=False)


# ---------------------------------------------------------------- helpers

def find_experiment(name_or_dir: str) -> str:
    """An experiment folder from a name (``runs/<name>`` here or at the project root), a folder,
    a storage URI, or a spec file (its ``<output.dir>/<name>``)."""
    if is_uri(name_or_dir):
        return name_or_dir.rstrip("/")
    path = Path(name_or_dir)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return load_spec(path).experiment_dir
    if path.is_dir():
        return str(path.resolve())
    candidates = [Path.cwd() / layout.RUNS_DIR / name_or_dir, project_root(Path.cwd()) / layout.RUNS_DIR / name_or_dir]
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate.resolve())
    raise UserError(f"no experiment '{name_or_dir}': not a folder, and not in "
                    f"{' or '.join(sorted({str(c.parent) for c in candidates}))}; pass the experiment "
                    "folder (<output.dir>/<name>), its storage URI, or the spec file")


def _leaderboard(exp: str, write: bool) -> results.Leaderboard:
    return storage.write_results(exp) if write else storage.read_leaderboard(exp)


def _counts(board: results.Leaderboard) -> str:
    return ", ".join(f"{n} {s}" for s, n in board.counts().items())


def _print_board(board: results.Leaderboard, exp: str) -> None:
    if not console.is_terminal:  # a pipe or a Ray job's log: the markdown table reads well as text
        console.out(results.to_markdown(board), highlight=False)
        console.out(f"leaderboard: {exp}/leaderboard.{{md,csv,json,png}}", highlight=False)
        return
    headers, rows = results.table_rows(board)
    # A terminal is narrow: the base perplexity goes in the title, the step column only while
    # something runs, and the trial id never wraps.
    drop = {"base ppl"} | ({"step"} if all(r.status in ("finished", "failed") for r in board.rows) else set())
    if console.width < 120:  # the files have every column
        drop |= {"#", "peak GiB", "wall s", "overhead s", "tokens/s"}
    keep = [i for i, h in enumerate(headers) if h not in drop]
    status_col = headers.index("status")
    rows = [[row[i] if i != status_col else board.rows[n].status for i in range(len(row))]
            for n, row in enumerate(rows)]  # failure reasons are listed below the table
    title = f"{board.name}: {len(board.rows)} trial(s), {_counts(board)}"
    if board.base_ppl is not None:
        title += f"; base eval ppl {board.base_ppl:.2f}"
    table = Table(title=title, title_justify="left")
    for i in keep:
        name = {"train loss": "loss"}.get(headers[i], headers[i])
        table.add_column(name, justify="left" if name in ("trial", "status") else "right",
                         no_wrap=True, min_width=len(name))
    for row in rows:
        table.add_row(*(row[i] for i in keep))
    console.print(table)
    best = board.best
    if best is not None:
        console.print(f"best: {best.trial_id} (eval ppl {best.eval_ppl:.2f}) -> {exp}/best",
                      highlight=False, soft_wrap=True)
    for row in board.failed:
        console.print(f"[red]failed[/] {row.trial_id}: {row.reason or 'no reason recorded'}",
                      highlight=False, soft_wrap=True)
    console.print(f"leaderboard: {exp}/leaderboard.{{md,csv,json,png}}", highlight=False, soft_wrap=True)
