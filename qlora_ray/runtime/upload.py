"""What ``submit --detach`` uploads to a remote cluster (the project folder, less the excludes),
and which of those files look like secrets: a token or key file would land on every node of the
cluster and in Ray's package store there, readable by whoever runs jobs on it."""

from __future__ import annotations

import fnmatch
import os
import subprocess
from pathlib import Path
from typing import List, Sequence

# Names (matched case-insensitively) of files that usually hold credentials.
SECRET_PATTERNS = (".env", ".env.*", "*.env", "*token*", "*secret*", "*credential*", "*.pem", "*.key", "*.p12",
                   "*.pfx", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", ".netrc", ".pypirc", "*.keytab",
                   "service-account*.json", "*apikey*", "*api_key*")
# Names those patterns catch that are not secrets: tokenizer files of a model, source code.
NOT_SECRETS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "*.py", "*.md")
_MAX_FILES = 50_000  # a project folder far beyond this is not looked through to the end


def _excluded(rel: str, excludes: Sequence[str]) -> bool:
    parts = rel.split("/")
    for pattern in excludes:
        pattern = pattern.rstrip("/")
        if fnmatch.fnmatch(rel, pattern) or any(fnmatch.fnmatch(p, pattern) for p in parts) \
                or rel.startswith(pattern + "/"):
            return True
    return False


def _gitignored(root: Path, rels: List[str]) -> set:
    if not rels or not (root / ".git").exists():
        return set()
    try:
        out = subprocess.run(["git", "-C", str(root), "check-ignore", "--stdin"], input="\n".join(rels),
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return set()
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


def secret_like_files(root: Path, excludes: Sequence[str]) -> List[str]:
    """Files under ``root`` (relative paths) that would be uploaded and whose names look like
    secrets: not excluded, not ignored by git."""
    root = Path(root)
    found, seen = [], 0
    for folder, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(folder, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        dirs[:] = [d for d in dirs if not _excluded(f"{rel_dir}/{d}".lstrip("/"), excludes)]
        for name in files:
            seen += 1
            rel = f"{rel_dir}/{name}".lstrip("/")
            lower = name.lower()
            if any(fnmatch.fnmatch(lower, p) for p in SECRET_PATTERNS) and \
                    not any(fnmatch.fnmatch(lower, p) for p in NOT_SECRETS) and not _excluded(rel, excludes):
                found.append(rel)
        if seen > _MAX_FILES:
            break
    ignored = _gitignored(root, found)
    return sorted(f for f in found if f not in ignored)


def upload_notes(root: Path, excludes: Sequence[str]) -> List[str]:
    """Lines for the user: what is left out of the upload, and a warning naming secret-like files."""
    notes = [f"uploading {root} to the cluster, without: {', '.join(excludes)} (and what .gitignore lists)"]
    secrets = secret_like_files(root, excludes)
    if secrets:
        shown = ", ".join(secrets[:10]) + (f" and {len(secrets) - 10} more" if len(secrets) > 10 else "")
        notes.append(f"warning: the upload includes files that look like secrets: {shown}. Every node of the "
                     "cluster gets a copy. Move them out of the project, or list them in .gitignore.")
    return notes
