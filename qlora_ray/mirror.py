"""An experiment on the Hugging Face Hub (``output.dir: hf://datasets/<user>/<repo>[/folder]`` or
``hf://buckets/<user>/<bucket>[/folder]``): run in a local staging folder mirrored to the Hub. No Ray.

``submit`` and ``train`` first fetch what the Hub holds of the experiment into the staging folder,
then run exactly as for a local ``output.dir``; the folder is pushed every few minutes while they
run and once more when they end (finished, stopped by ``resources.time_budget``, Ctrl-C or an
error), so the next session, on this machine or a fresh one, resumes from the Hub's copy.

Why a mirror and not Ray's ``storage_filesystem`` (a pyarrow ``PyFileSystem`` over fsspec's
``HfFileSystem``): every file written to a Hub repo is a commit, and Ray's own state (Tune's
experiment state, saved every few seconds, and a copy of every checkpoint) would make hundreds an
hour, which the Hub rate-limits, with trials waiting on the network at each report; a write to the
Hub is not atomic, so a session cut off mid-upload would leave torn files where Ray reads them; and
``qlora-ray train`` has no Ray at all. Here trials write a local folder (atomic renames, as for any
path) and a push sends the changed files in one commit, a checkpoint's manifest last (a checkpoint
without one is never resumed). Ray's own state (``_ray/``) stays local: a trial resumes from the
newest checkpoint in its own folder. The price: the staging folder is on the machine that runs the
command, so ``hf://`` suits one machine (Kaggle, Colab, a workstation); a multi-node cluster should
use a storage URI every node writes (``s3://``, ``gs://``).

The token is huggingface_hub's own (``HF_TOKEN`` or ``hf auth login``); it is never read here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from qlora_ray import layout
from qlora_ray.errors import UserError
from qlora_ray.records import now
from qlora_ray.spec import HUB_SCHEME

SYNC_EVERY_S = 300.0  # a push every 5 minutes: a commit each, well inside the Hub's rate limits


def is_hub(output_dir: str) -> bool:
    """``output.dir`` is on the Hugging Face Hub."""
    return output_dir.startswith(HUB_SCHEME)


def hub_filesystem(uri: str):
    """fsspec's filesystem for ``uri`` (``HfFileSystem`` for ``hf://``) and the path within it."""
    import fsspec.core

    return fsspec.core.url_to_fs(uri)


def _is_real_hub(fs) -> bool:
    try:
        from huggingface_hub import HfFileSystem
    except ImportError:
        return False
    return isinstance(fs, HfFileSystem)


def hub_problem(output_dir: str) -> Optional[str]:
    """What keeps ``output.dir`` (an ``hf://`` folder) from being written: no token, a repo or
    bucket that does not exist or cannot be reached. None when it can be written."""
    try:
        fs, path = hub_filesystem(output_dir)
    except ImportError:
        return (f"'{output_dir}' needs huggingface_hub (pip install huggingface_hub); or use a local "
                "output.dir")
    kind, owner, name = path.split("/")[:3]
    what = "bucket" if kind == "buckets" else "dataset repo"
    if _is_real_hub(fs):
        from huggingface_hub import get_token

        if get_token() is None:
            return (f"'{output_dir}' needs a Hugging Face token with write access: set HF_TOKEN, or run "
                    "`hf auth login` (never write the token into the spec)")
    create = (f"hf buckets create {owner}/{name}" if kind == "buckets"
              else f"hf repos create {owner}/{name} --repo-type dataset --private")
    try:
        found = _hub_exists(kind, f"{owner}/{name}") if _is_real_hub(fs) else fs.exists(f"{kind}/{owner}/{name}")
    except Exception as e:  # network, permission: say which, never the token
        return f"cannot reach the {what} '{owner}/{name}' on the Hub: {type(e).__name__}: {e}"
    if not found:
        return (f"the {what} '{owner}/{name}' does not exist on the Hub, or this token cannot see it; "
                f"create it (`{create}`) or log in as its owner (`hf auth login`)")
    return None


def _hub_exists(kind: str, repo_id: str) -> bool:
    """Through the Hub's API, which tells a missing repo (False) from an unreachable Hub (raises);
    ``HfFileSystem.exists`` answers False for both."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import BucketNotFoundError

    api = HfApi()
    if kind != "buckets":
        return api.repo_exists(repo_id, repo_type="dataset")
    try:
        api.bucket_info(repo_id)
    except BucketNotFoundError:
        return False
    return True


def check_hub(output_dir: str) -> None:
    """Raise :class:`UserError` (exit 2) naming ``output.dir`` when :func:`hub_problem` finds one."""
    problem = hub_problem(output_dir)
    if problem:
        raise UserError(f"output.dir: {problem}")


class Mirror:
    """One experiment's local staging folder and its copy on the Hub."""

    def __init__(self, uri: str, local: Path):
        self.uri, self.local = uri.rstrip("/"), Path(local)
        self.fs, self.remote = hub_filesystem(self.uri)
        self.remote = self.remote.rstrip("/")
        self._pushed: Dict[str, Tuple[int, int]] = {}  # rel -> (size, mtime_ns) as the Hub has it
        self._lock = threading.Lock()

    # ------------------------------------------------------------ reading the Hub
    def _remote_files(self) -> Dict[str, int]:
        try:
            found = self.fs.find(self.remote, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for name, info in found.items():
            rel = name[len(self.remote):].lstrip("/") if name.startswith(self.remote) else None
            if rel and info.get("type") == "file" and not _skipped(rel):
                out[rel] = int(info.get("size") or 0)
        return out

    def _remote_marker(self) -> Optional[str]:
        try:
            return self.fs.cat_file(f"{self.remote}/{layout.SYNC_FILE}").decode("utf-8")
        except (FileNotFoundError, OSError, UnicodeDecodeError):
            return None

    def pull(self) -> int:
        """Fetch the Hub's files into the staging folder; returns how many were fetched.

        The staging folder is kept when the Hub holds what this folder last pushed or fetched
        (it may be newer: a push can fail); otherwise (another machine pushed since, or this is a
        fresh one) it is emptied and fetched whole."""
        marker = self._remote_marker()
        local_marker = self.local / layout.SYNC_FILE
        if marker is not None and (not local_marker.is_file() or local_marker.read_text("utf-8") != marker):
            shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True, exist_ok=True)
        remote = self._remote_files()
        fetched = 0
        for rel in sorted(remote):
            target = self.local / rel
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.pull")
            self.fs.get_file(f"{self.remote}/{rel}", str(tmp))
            os.replace(tmp, target)
            fetched += 1
        here = _local_files(self.local)
        # What the Hub holds counts as pushed; a local file of another size goes up on the next push.
        self._pushed = {rel: st for rel, st in here.items() if remote.get(rel) == st[0]}
        if marker is not None:
            local_marker.write_text(marker, encoding="utf-8")
        return fetched

    def move_aside(self) -> Optional[str]:
        """``--fresh``: the Hub's copy renamed to ``<name>.old-<time>`` (never deleted), the staging
        folder emptied; returns the new URI, or None when the Hub held nothing."""
        if not self._remote_files():
            shutil.rmtree(self.local, ignore_errors=True)
            return None
        stamp = now().replace(":", "").replace("-", "")[:15]
        self.fs.mv(self.remote, f"{self.remote}.old-{stamp}", recursive=True)
        shutil.rmtree(self.local, ignore_errors=True)
        return f"{self.uri}.old-{stamp}"

    # ------------------------------------------------------------ writing the Hub
    def push(self) -> int:
        """Send the files changed since the last push (and drop those deleted here, such as
        checkpoints rotated out); returns how many files were sent."""
        with self._lock:
            _best_file(self.local)
            here = _local_files(self.local)
            changed = sorted((rel for rel, st in here.items() if self._pushed.get(rel) != st),
                             key=lambda rel: (rel.rsplit("/", 1)[-1] == layout.MANIFEST_FILE, rel))
            gone = sorted(rel for rel in self._pushed if rel not in here)
            if not changed and not gone:
                return 0
            marker = json.dumps({"generation": uuid.uuid4().hex, "time": now()}) + "\n"
            self._commit(changed, gone, marker)
            for rel in gone:
                self._pushed.pop(rel, None)
            self._pushed.update({rel: here[rel] for rel in changed})
            (self.local / layout.SYNC_FILE).write_text(marker, encoding="utf-8")
            return len(changed)

    def _commit(self, changed: List[str], gone: List[str], marker: str) -> None:
        if _is_real_hub(self.fs):
            _hub_commit(self.fs, self.remote, [(self.local / rel, rel) for rel in changed], gone, marker)
            return
        for rel in changed:
            target = f"{self.remote}/{rel}"
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(self.local / rel), target)
        for rel in gone:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(f"{self.remote}/{rel}")
        self.fs.pipe_file(f"{self.remote}/{layout.SYNC_FILE}", marker.encode("utf-8"))


def _hub_commit(fs, remote: str, adds: List[Tuple[Path, str]], gone: List[str], marker: str) -> None:
    """One commit on a Hub repo (one batch on a bucket) for the whole push: many small commits
    would meet the Hub's rate limits, and a repo's commit is all or nothing."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    resolved = fs.resolve_path(remote)
    base = (getattr(resolved, "path_in_repo", None) or getattr(resolved, "path", "") or "").strip("/")
    at = (lambda rel: f"{base}/{rel}" if base else rel)
    api = HfApi()
    bucket = getattr(resolved, "bucket_id", None)
    if bucket:
        api.batch_bucket_files(bucket, add=[(str(path), at(rel)) for path, rel in adds]
                               + [(marker.encode("utf-8"), at(layout.SYNC_FILE))],
                               delete=[at(rel) for rel in gone] or None)
    else:
        operations = [CommitOperationAdd(path_in_repo=at(rel), path_or_fileobj=str(path)) for path, rel in adds]
        operations += [CommitOperationDelete(path_in_repo=at(rel)) for rel in gone]
        operations.append(CommitOperationAdd(path_in_repo=at(layout.SYNC_FILE), path_or_fileobj=marker.encode("utf-8")))
        api.create_commit(repo_id=resolved.repo_id, repo_type=resolved.repo_type, revision=resolved.revision,
                          operations=operations, commit_message=f"qlora-ray: {len(adds)} file(s) of {base or 'the experiment'}")
    fs.invalidate_cache(remote)


def _skipped(rel: str) -> bool:
    """Not mirrored: Ray's own state, hidden files (temp files, the sync marker, a checkpoint being
    written) and the ``best`` link (``best.txt`` stands for it)."""
    parts = rel.split("/")
    return parts[0] in (layout.RAY_DIR, layout.BEST_LINK) or any(p.startswith(".") for p in parts)


def _local_files(folder: Path) -> Dict[str, Tuple[int, int]]:
    out = {}
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if _skipped(rel) or path.is_symlink():
            continue
        with contextlib.suppress(FileNotFoundError):  # a checkpoint rotated out while we look
            if path.is_file():
                st = path.stat()
                out[rel] = (st.st_size, st.st_mtime_ns)
    return out


def _best_file(folder: Path) -> None:
    """``best.txt`` naming the trial the local ``best`` link points at (the Hub keeps no links)."""
    link = folder / layout.BEST_LINK
    if link.is_symlink():
        text = Path(os.readlink(link)).name + "\n"
        target = folder / layout.BEST_FILE
        if not target.is_file() or target.read_text("utf-8") != text:
            target.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def syncing(mirror: Mirror, say: Callable[[str], None], every: float = SYNC_EVERY_S) -> Iterator[None]:
    """Push ``mirror`` every ``every`` seconds while the block runs, and once more when it ends."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            try:
                mirror.push()
            except Exception as e:  # the next push or the last one sends it; training goes on
                say(f"warning: could not upload to {mirror.uri} (retried later): {type(e).__name__}: {e}")

    thread = threading.Thread(target=loop, name="qlora-ray-hub-sync", daemon=True)
    thread.start()
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        stop.set()
        thread.join()
        _last_push(mirror, say, quiet_errors=failed)


def _last_push(mirror: Mirror, say: Callable[[str], None], quiet_errors: bool) -> None:
    try:
        sent = mirror.push()
    except Exception as e:
        text = (f"could not upload {mirror.local} to {mirror.uri}: {type(e).__name__}: {e}. The files are "
                "kept there; run the same command again to upload them (finished trials are not trained again)")
        if quiet_errors:  # the block's own error is the one to see
            say(f"warning: {text}")
            return
        raise UserError(f"output.dir: {text}") from None
    say(f"{mirror.uri}: up to date ({sent} file(s) uploaded)")


@contextlib.contextmanager
def hub_experiment(output_dir: str, name: str, fresh: bool, say: Callable[[str], None]) -> Iterator[Optional[str]]:
    """For an ``hf://`` output.dir: the local folder to run in as ``output.dir`` (the experiment
    fetched into it first, mirrored to the Hub while the block runs and when it ends). None, and
    nothing done, for any other output.dir."""
    if not is_hub(output_dir):
        yield None
        return
    check_hub(output_dir)
    staging = layout.hub_staging(output_dir)
    mirror = Mirror(f"{output_dir.rstrip('/')}/{name}", staging / name)
    try:
        if fresh:
            moved = mirror.move_aside()
            if moved:
                say(f"--fresh: moved the previous experiment on the Hub to {moved}")
        fetched = mirror.pull()
    except Exception as e:  # the Hub went away between the check and here, or refused a read
        raise UserError(f"output.dir: could not fetch {mirror.uri} into {mirror.local}: "
                        f"{type(e).__name__}: {e}; run the command again") from None
    say(f"{mirror.uri}: mirrored in {mirror.local}" + (f" ({fetched} file(s) fetched)" if fetched else ""))
    with syncing(mirror, say):
        yield str(staging)
