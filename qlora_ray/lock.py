"""One run of an experiment at a time: two runs writing the same trial folders would interleave
checkpoints and metric rows. ``submit`` and ``train`` hold ``<output.dir>/.<name>.lock`` while
they run (beside the experiment folder, so ``--fresh`` can move that folder aside and a spec that
is refused leaves no experiment folder behind); a second run is refused, naming the first."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Iterator

from qlora_ray.errors import UserError


def lock_path(experiment_dir: str | os.PathLike) -> Path:
    exp = Path(experiment_dir)
    return exp.parent / f".{exp.name}.lock"


@contextlib.contextmanager
def experiment_lock(experiment_dir: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the experiment's lock for the block; a UserError when another run holds it."""
    from filelock import FileLock, Timeout

    path = lock_path(experiment_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = path.with_name(path.name + ".owner")
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = owner.read_text(encoding="utf-8").strip() if owner.is_file() else "another process"
        raise UserError(f"experiment '{Path(experiment_dir).name}' is already being run ({holder}); two runs "
                        f"would write the same trial folders. Wait for it to end (or stop it), or give this "
                        f"run another name (name=...). Lock: {path}") from None
    try:
        owner.write_text(f"{what}, pid {os.getpid()} on {socket.gethostname()}\n", encoding="utf-8")
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()
