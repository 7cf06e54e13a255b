"""Connecting the driver to Ray: an embedded local Ray of our own (loopback only), or ``--address``."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import ray

from qlora_ray.cluster import LOOPBACK, is_loopback, loopback_node_ip, prepare_auth_env
from qlora_ray.errors import UserError
from qlora_ray.runtime import ray_compat
from qlora_ray.runtime.capacity import Cluster
from qlora_ray.runtime.exposure import exposure_notes

log = logging.getLogger(__name__)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type when the message is empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass(frozen=True)
class ConnectOptions:
    """Which Ray to use: ``address`` of a running cluster, else a local Ray of our own."""

    address: Optional[str] = None
    dashboard: bool = True
    dashboard_host: str = LOOPBACK


@contextlib.contextmanager
def connect(options: ConnectOptions = ConnectOptions()) -> Iterator[Cluster]:
    """Start an embedded local Ray (dashboard on ``options.dashboard_host``) or join ``options.address``
    (default: ``$RAY_ADDRESS``).

    Worker output goes to Ray's log files, not this terminal (``log_to_driver=False``); the
    progress table is the terminal's. A Ray already initialized in this process is reused.
    """
    owned = not ray.is_initialized()
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    ray_compat.silence_auth_notice()
    url, session = None, None
    if owned:
        ctx = _join(address) if address else _start_local(options.dashboard, options.dashboard_host)
        url = ctx.dashboard_url or None
        session = ctx.address_info.get("session_dir")
    try:
        nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
        dashboard_url = f"http://{url}" if url and "://" not in url else url
        yield Cluster(address=address or "local", embedded=not address and owned, dashboard_url=dashboard_url,
                      log_dir=f"{session}/logs" if session else None, nodes=nodes,
                      notes=exposure_notes(address, options.dashboard_host, dashboard_url) if owned else [])
    finally:
        if owned:
            ray.shutdown()


_QUIET = dict(log_to_driver=False, logging_level=logging.WARNING)


def _join(address: str):
    prepare_auth_env()
    try:
        with loopback_node_ip(is_loopback(address)):
            return ray.init(address=address, **_QUIET)
    except Exception as e:  # ConnectionError, auth errors, bad address
        raise UserError(f"--address {address}: cannot connect to Ray: {first_line(e)}\n"
                        "  Start a cluster with `ray start --head`, or check the address "
                        "(auto, host:6379, ray://host:10001).") from None


def _start_local(dashboard: bool, dashboard_host: str):
    """A new local Ray whose node address is 127.0.0.1: its GCS, raylet and workers register
    the loopback address, nothing on this machine's network address. ``address="local"``:
    always a Ray of our own, never one `ray start` left on this machine."""
    with_dashboard = dashboard and ray_compat.dashboard_available()
    kwargs = dict(include_dashboard=with_dashboard, dashboard_host=dashboard_host if with_dashboard else LOOPBACK,
                  **_QUIET)
    # Ray waits a fixed 30 s for its raylet to register; on a busy 2-core laptop that can run
    # out, and a second start usually succeeds.
    for attempt in range(3):
        try:
            # Ray would swap 127.0.0.1 for this machine's network IP.
            with loopback_node_ip(), ray_compat.env_defaults(ray_compat.LOCAL_RAY_ENV):
                return ray.init(address="local", _node_ip_address=LOOPBACK, **kwargs)
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
            log.warning("the local Ray did not start in time (busy machine?); trying again")
