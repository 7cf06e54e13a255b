"""Writing a file or a folder so that readers see all of it or none of it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Iterator, Optional


@contextlib.contextmanager
def publish_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``final`` to fill; when the block succeeds it is renamed
    to ``final`` (replacing one that exists), when it fails it is removed.

    The temp folder is ``.<name>.<random>`` in the same parent (a rename never crosses file
    systems), so a crash leaves at most a hidden folder and never a half-written ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; model caches and runs may be shared
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            final.unlink()
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``path`` atomically (a temp file beside it, renamed): a reader of a running sweep
    never sees half a file, and a crash leaves the old content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def move_aside(folder: Path) -> Optional[Path]:
    """Move ``<exp>/<trial>`` to ``<exp>.old-<time>/<trial>`` (as ``submit --fresh`` moves a whole
    experiment), so a fresh start never deletes the previous run; None when there is nothing."""
    folder = Path(folder)
    if not folder.exists():
        return None
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    target = folder.parent.with_name(f"{folder.parent.name}.old-{stamp}") / folder.name
    n = 1
    while target.exists():
        target = target.with_name(f"{folder.name}.{n}")
        n += 1
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(folder, target)
    return target
