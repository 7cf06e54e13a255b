"""Results: one leaderboard from the per-trial files of an experiment folder.

Pure file work (no torch, no ray), so it runs on a laptop against a finished sweep, or against
one still running: everything is read from what each trial has written so far.

It reads the records of an experiment folder (names in ``layout``, types in ``records``): the
plan in ``experiment.json`` (so trials that have not started yet still get a row), the base
figures in ``baseline.json``, and per trial ``status.json`` (the runtime's state, reason and wall
time), ``result.json`` (the final figures) and ``metrics.jsonl`` (one row per logged step).

:func:`write_leaderboard` adds ``leaderboard.{csv,json,md,png}`` and ``best -> <trial>``.

- ``board``: :class:`TrialRow`, :class:`Leaderboard` (ranking, the selected best) and the trial states;
- ``read``: an experiment folder read into a leaderboard;
- ``render``: the table, markdown, CSV and JSON;
- ``chart``: the figure (matplotlib, imported only when a plot is drawn);
- ``write``: the leaderboard files and the ``best`` link.

Everything below is imported from ``qlora_ray.results``.
"""

from qlora_ray.results.board import (FAILED, FINISHED, PENDING, PRUNED, RUNNING, STOPPED, Leaderboard,
                                     TrialRow)
from qlora_ray.results.read import read_leaderboard, read_trial
from qlora_ray.results.render import (COLUMNS, OPTIONAL_COLUMNS, progress, resume_hint, table_rows, to_csv,
                                      to_json, to_markdown, to_records)
from qlora_ray.results.chart import figure, plot
from qlora_ray.results.write import link_best, write_leaderboard

__all__ = [
    "COLUMNS", "FAILED", "FINISHED", "OPTIONAL_COLUMNS", "PENDING", "PRUNED", "RUNNING", "STOPPED",
    "Leaderboard", "TrialRow", "figure", "link_best", "plot", "progress", "read_leaderboard", "read_trial",
    "resume_hint", "table_rows", "to_csv", "to_json", "to_markdown", "to_records", "write_leaderboard",
]
