"""The ``qlora-ray`` command line: one typer app; each module below adds the verbs of one concern."""

from qlora_ray.cli.app import app, main

# Importing the command modules registers their verbs on ``app``.
from qlora_ray.cli import spec_cmds  # noqa: E402,F401
from qlora_ray.cli import ray_cmds  # noqa: E402,F401
from qlora_ray.cli import cluster_cmds  # noqa: E402,F401
from qlora_ray.cli import data_cmds  # noqa: E402,F401
from qlora_ray.cli import train_cmds  # noqa: E402,F401
from qlora_ray.cli import export_cmds  # noqa: E402,F401

__all__ = ["app", "main"]
