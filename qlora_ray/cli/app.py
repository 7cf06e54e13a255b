"""The typer app and the error boundary shared by every verb."""

from __future__ import annotations

import functools
import sys
from typing import Callable

import typer
from rich.console import Console

from qlora_ray.errors import UserError

app = typer.Typer(
    name="qlora-ray",
    help="Declarative QLoRA fine-tuning of small chat LLMs on Ray.\n\n"
    "Example: qlora-ray validate jobs/hinglish_sweep.yaml train.lr=1e-4",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def say(text: str) -> None:
    """Print a line of progress as it is (no markup, no highlighting: paths and URIs stay intact)."""
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def user_errors(fn: Callable) -> Callable:
    """Turn a :class:`UserError` into its message on stderr and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err_console.print("[bold red]error:[/]", end=" ")
            err_console.print(str(e), markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.callback()
def _root() -> None:
    """Declarative QLoRA fine-tuning of small chat LLMs on Ray."""


def main() -> None:
    """Console-script entry point."""
    app(prog_name="qlora-ray")


if __name__ == "__main__":
    sys.exit(main())
