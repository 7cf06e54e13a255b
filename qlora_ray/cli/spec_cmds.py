"""``qlora-ray validate``: check specs and show the trial plan without running anything."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import List

import typer
from rich.table import Table

from qlora_ray.cli.app import app, console, user_errors
from qlora_ray.errors import UserError
from qlora_ray.mirror import hub_problem, is_hub
from qlora_ray.plan import expand
from qlora_ray.spec import SpecError, load_spec, to_yaml


def split_args(args: List[str]) -> tuple[List[Path], List[str]]:
    """Split positional arguments into spec files and ``key=value`` overrides."""
    specs = [Path(a) for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    if not specs:
        raise UserError("no spec file given; e.g. qlora-ray validate jobs/hinglish_r16.yaml")
    return specs, overrides


@app.command()
@user_errors
def validate(
    args: List[str] = typer.Argument(..., metavar="SPEC... [KEY=VALUE...]",
                                     help="Spec files, then dotted overrides applied to each."),
    as_json: bool = typer.Option(False, "--json", help="Print the resolved specs and plans as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only problems."),
) -> None:
    """Check job specs (every problem at once) and print each resolved spec and its trial plan.

    Examples:
      qlora-ray validate jobs/*.yaml
      qlora-ray validate jobs/hinglish_sweep.yaml train.lr=1e-4 lora.r=8 --json
    """
    specs, overrides = split_args(args)
    problems, out = [], []
    for path in specs:
        try:
            spec = load_spec(path, overrides)
        except SpecError as e:
            problems.extend(e.problems)
            continue
        if is_hub(spec.output.dir):  # can the run write there (a token, an existing repo)?
            problem = hub_problem(spec.output.dir)
            if problem:
                problems.append(f"{path}: output.dir: {problem}")
                continue
        trials = expand(spec)
        out.append({"file": str(path), "spec": asdict(spec),
                    "trials": [{"id": t.id, "values": t.values} for t in trials]})
        if not as_json and not quiet:
            console.rule(f"{path}")
            console.print(to_yaml(spec), markup=False, highlight=False)
            console.print(_plan_table(spec.name, trials))
    if as_json:
        console.print_json(json.dumps(out))
    if problems:
        raise SpecError(problems)
    if not as_json:
        console.print(f"[green]ok[/]: {len(specs)} spec(s) valid, "
                      f"{sum(len(o['trials']) for o in out)} trial(s) planned")


def _plan_table(name: str, trials) -> Table:
    keys = list(trials[0].values) if trials else []
    table = Table(title=f"plan: {name} ({len(trials)} trial{'s' if len(trials) != 1 else ''})")
    table.add_column("#", justify="right")
    table.add_column("trial id")
    for key in keys:
        table.add_column(key, justify="right")
    for i, trial in enumerate(trials):
        table.add_row(str(i), trial.id, *(str(trial.values[k]) for k in keys))
    return table
