"""Writing the leaderboard files of an experiment folder and its ``best`` link."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from qlora_ray import layout
from qlora_ray.files import write_text
from qlora_ray.results.board import Leaderboard
from qlora_ray.results.chart import plot
from qlora_ray.results.read import read_leaderboard
from qlora_ray.results.render import to_csv, to_json, to_markdown


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
