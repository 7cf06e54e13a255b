"""Warnings about a Ray that others can reach: a dashboard on every interface, or a cluster
joined with ``--address`` that accepts clients without a token. Anyone who can talk to such a
Ray can run code on its machines (a job, a task), so the user is told before trials start."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from typing import List, Optional

from qlora_ray.cluster import is_loopback

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def requires_token(dashboard_url: str, timeout: float = 3.0) -> Optional[bool]:
    """Whether the dashboard's HTTP API refuses a request without a token (401): True, False when
    it answers one, None when it cannot be asked."""
    try:
        with urllib.request.urlopen(f"{dashboard_url.rstrip('/')}/api/version", timeout=timeout):
            return False
    except urllib.error.HTTPError as e:
        return True if e.code in (401, 403) else None
    except (OSError, ValueError):
        return None


def exposure_notes(address: Optional[str], dashboard_host: str, dashboard_url: Optional[str]) -> List[str]:
    """Warnings for the Ray just connected to (``address`` None: the local Ray we started)."""
    notes = []
    if address is None and dashboard_host not in _LOOPBACK_HOSTS:
        notes.append(f"warning: --dashboard-host {dashboard_host}: the Ray dashboard listens beyond this machine; "
                     "anyone who reaches it and holds the token (`ray get-auth-token`) can run code here. "
                     "Prefer the default 127.0.0.1 and an SSH tunnel (ssh -L 8265:127.0.0.1:8265 HOST).")
    if address is not None and not is_loopback(address):
        open_api = requires_token(dashboard_url) is False if dashboard_url else None
        no_token = os.environ.get("RAY_AUTH_MODE") != "token"
        if open_api or (open_api is None and no_token):
            notes.append(f"warning: --address {address}: this cluster accepts clients without a token; anyone "
                         "who can reach it can run code on its machines. Start its head with token "
                         "authentication (RAY_AUTH_MODE=token ray start --head ...) or keep it on a private network.")
    return notes
