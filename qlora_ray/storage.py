"""An experiment folder as a local path or a storage URI (s3://, gs://, file://, ...), without Ray.

Everything the driver, the trial functions and the workers write goes through :class:`Storage`,
so a trial on another node writes where the driver reads (given shared storage: a URI, or a
filesystem mounted at the same path on every node). Reading results from a URI needs only
pyarrow's filesystems, never Ray.
"""

from __future__ import annotations

import contextlib
import os
from datetime import datetime
from pathlib import Path
from typing import Optional, Type, TypeVar

import pyarrow.fs as pafs

from qlora_ray import layout, results
from qlora_ray.errors import disk_full_as
from qlora_ray.records import Record
from qlora_ray.spec import HUB_SCHEME, URI_SCHEMES

R = TypeVar("R", bound=Record)


def is_uri(text: str) -> bool:
    """A storage URI (``s3://``, ``gs://``, ``file://``, ``hf://``...) rather than a path."""
    return text.startswith(URI_SCHEMES) or text.startswith(HUB_SCHEME)


def _filesystem(uri: str):
    """pyarrow's filesystem for ``uri`` and the path in it; ``hf://`` through fsspec's HfFileSystem
    (read here; runs write it through :mod:`qlora_ray.mirror`)."""
    if uri.startswith(HUB_SCHEME):
        import fsspec.core

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path.rstrip("/")
    return pafs.FileSystem.from_uri(uri)


class Storage:
    """An experiment folder: a local path or a URI pyarrow (and so Ray) accepts."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") if is_uri(root) else str(Path(root).resolve())
        if is_uri(self.root):
            self.fs, self._path = _filesystem(self.root)
            self.local: Optional[Path] = Path(self._path) if isinstance(self.fs, pafs.LocalFileSystem) else None
        else:
            self.fs, self._path = pafs.LocalFileSystem(), str(Path(self.root).resolve())
            self.local = Path(self._path)

    @property
    def is_local_path(self) -> bool:
        """A plain path here (not a URI): trials write straight into it."""
        return not is_uri(self.root)

    def path(self, rel: str = "") -> str:
        return f"{self._path}/{rel}".rstrip("/") if rel else self._path

    def uri(self, rel: str = "") -> str:
        """What Ray's ``storage_path`` gets for ``rel``."""
        return f"{self.root}/{rel}".rstrip("/") if rel else self.root

    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_text(self, rel: str) -> Optional[str]:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read().decode("utf-8")
        except (FileNotFoundError, OSError, UnicodeDecodeError):
            return None

    def read_record(self, cls: Type[R], rel: str) -> Optional[R]:
        """The record of type ``cls`` at ``rel``; None when missing, torn or unreadable."""
        return cls.parse(self.read_text(rel))

    def write_record(self, rel: str, record: Record) -> None:
        self.write_text(rel, record.to_json() + "\n")

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_bytes(self, rel: str, blob: bytes) -> None:
        parent = self.path(rel).rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if self.local is not None:  # atomic on a filesystem: readers of a running sweep see whole files
            tmp = f"{parent}/.{rel.rsplit('/', 1)[-1]}.{os.getpid()}.tmp"
            with self.fs.open_output_stream(tmp) as f:
                f.write(blob)
            self.fs.move(tmp, self.path(rel))
            return
        with self.fs.open_output_stream(self.path(rel)) as f:
            f.write(blob)

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_file(self.path(rel))

    def upload(self, local_dir: Path, rel: str, skip: tuple = (layout.CHECKPOINTS_DIR,)) -> None:
        """Copy a local folder's files to ``rel`` (used when storage is a URI). The trial's own
        checkpoints stay behind: Ray Train already keeps the ones that resume it in storage."""
        for path in sorted(local_dir.rglob("*")):
            name = path.relative_to(local_dir).as_posix()
            if path.is_file() and not any(part in skip for part in name.split("/")[:-1]):
                target = self.path(f"{rel}/{name}")
                self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                with self.fs.open_output_stream(target) as out:
                    out.write(path.read_bytes())

    def download(self, dest: Path, rel: str = "",
                 skip: tuple = (layout.RAY_DIR, layout.ADAPTER_DIR, layout.CHECKPOINTS_DIR)) -> Path:
        """Mirror the experiment's files (or those under ``rel``) into ``dest``, minus folders
        named in ``skip`` (Ray's state, adapters, checkpoints: the leaderboard needs none)."""
        dest.mkdir(parents=True, exist_ok=True)
        top = self.path(rel)
        selector = pafs.FileSelector(top, recursive=True, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            name = info.path[len(top):].lstrip("/")
            if info.type != pafs.FileType.File or any(part in skip for part in name.split("/")[:-1]):
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(info.path) as src, open(target, "wb") as out:
                out.write(src.read())
        return dest

    def move_aside(self) -> Optional[str]:
        """Rename the experiment to ``<name>.old-<time>`` (never delete results); returns the new name."""
        if not self.exists():
            return None
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        target = f"{self.path()}.old-{stamp}"
        try:
            self.fs.move(self.path(), target)
        except (OSError, NotImplementedError):  # object stores cannot rename folders: copy, then drop
            pafs.copy_files(self.path(), target, source_filesystem=self.fs, destination_filesystem=self.fs)
            self.fs.delete_dir(self.path())
        return f"{self.root}.old-{stamp}"


def local_mirror(exp: str) -> Path:
    """A local folder with the experiment's files: the folder itself, or a download of a URI."""
    storage = Storage(exp)
    if storage.local is not None:
        return storage.local
    return storage.download(layout.experiment_cache(exp))


def read_leaderboard(exp: str) -> results.Leaderboard:
    """The leaderboard of a folder or a URI, as it stands (nothing written)."""
    return results.read_leaderboard(local_mirror(exp))


def write_results(exp: str, with_plot: bool = True) -> results.Leaderboard:
    """Write the leaderboard next to the trials (for a URI: into a local mirror, then upload)."""
    storage = Storage(exp)
    folder = local_mirror(exp)
    with disk_full_as("the leaderboard", folder):
        board = results.write_leaderboard(folder, with_plot=with_plot)
    if storage.local is None:
        for suffix in layout.LEADERBOARD_SUFFIXES:
            path = folder / layout.leaderboard_file(suffix)
            if path.exists():
                storage.write_bytes(path.name, path.read_bytes())
        best = board.best
        storage.write_text(layout.BEST_FILE, (best.trial_id + "\n") if best else "")
    return board


def read_record(exp: str, cls: Type[R], rel: str) -> Optional[R]:
    """A record of an experiment given as a folder or a URI."""
    return Storage(exp).read_record(cls, rel)

