"""``submit --detach``: the experiment as a Ray Job on a running cluster, and reading it back.

The job runs ``qlora-ray submit SPEC ... --address auto`` on the cluster; ``job.json`` in the
experiment folder records it, so ``status`` and ``logs`` find it by the experiment's name.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from qlora_ray import layout
from qlora_ray.cluster import prepare_auth_env
from qlora_ray.errors import UserError
from qlora_ray.plan import expand
from qlora_ray.records import JobRecord, now
from qlora_ray.runtime import ray_compat
from qlora_ray.runtime.connect import first_line
from qlora_ray.runtime.upload import upload_notes
from qlora_ray.spec import JobSpec, load_spec, project_root, to_yaml
from qlora_ray.storage import Storage, is_uri

# The interpreter a --detach job runs on a remote cluster (default: `python` on the head's PATH).
JOB_PYTHON_ENV = "QLORA_RAY_JOB_PYTHON"


@dataclass
class JobState:
    """A detached job as the cluster reports it now."""

    job_id: str
    status: str
    message: Optional[str]
    start_time: Optional[int]
    end_time: Optional[int]
    address: str


def _job_client(address: Optional[str]):
    from ray.job_submission import JobSubmissionClient

    prepare_auth_env()
    ray_compat.quiet_job_sdk()
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, ValueError (no running cluster found)
        raise UserError(f"--detach needs a running Ray cluster to submit to ({address or 'auto-detect'}): "
                        f"{first_line(e)}\n  Start one with `ray start --head` (then --address auto), or pass "
                        "--address http://HEAD:8265 / ray://HEAD:10001.") from None


def _is_local(url: str) -> bool:
    host = url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost", "0.0.0.0", socket.gethostname()) or host == _own_ip()


def _own_ip() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return ""


def _refuse_if_running(client, storage: Storage, name: str) -> None:
    previous = storage.read_record(JobRecord, layout.JOB_FILE)
    if previous is None:
        return
    try:
        state = str(client.get_job_status(previous.job_id))
    except Exception:
        state = "UNKNOWN"
    if state.endswith(("PENDING", "RUNNING")):
        raise UserError(f"experiment '{name}' is already running as job {previous.job_id}; follow it with "
                        f"`qlora-ray status {name}` (or stop it: ray job stop {previous.job_id})")


def submit_detached(spec_path: Path, overrides: List[str], console, address: Optional[str] = None,
                    fresh: bool = False) -> JobRecord:
    """Submit ``qlora-ray submit SPEC ...`` as a Ray Job and return at once; record ``job.json``."""
    spec = load_spec(spec_path, overrides)
    expand(spec)  # a bad sweep fails here, not on the cluster
    client = _job_client(address)
    api = client.get_address()
    storage = Storage(spec.experiment_dir)
    local_cluster = _is_local(api)
    _refuse_if_running(client, storage, spec.name)
    runtime_env: Dict[str, Any] = {"env_vars": dict(ray_compat.JOB_ENV)}
    if local_cluster:
        # Same machine, same files: the job reads the spec where it is; nothing to ship.
        python, job_spec, args, shipped = shlex.quote(sys.executable), str(spec_path.resolve()), list(overrides), {}
    else:
        # The cluster's Python, which must have qlora-ray installed (the runtime/ configs do).
        python = shlex.quote(os.environ.get(JOB_PYTHON_ENV, "python"))
        job_spec, args, shipped = _ship(spec, spec_path, overrides)
        runtime_env.update(shipped)
        if "excludes" in shipped:
            for note in upload_notes(Path(shipped["working_dir"]), shipped["excludes"]):
                console.print(note, highlight=False, markup=False, soft_wrap=True)
    if fresh:
        if local_cluster or not storage.is_local_path:
            moved = storage.move_aside()  # here, so job.json below lands in the new folder
            if moved:
                console.print(f"--fresh: moved the previous experiment to {moved}", highlight=False)
        else:
            args.append("--fresh")
    entrypoint = " ".join([python, "-m", "qlora_ray", "submit", shlex.quote(job_spec),
                           *(shlex.quote(a) for a in args), "--address", "auto"])
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint, submission_id=f"qlora-ray-{spec.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}",
            runtime_env=runtime_env, metadata={"qlora_ray_experiment": spec.name})
    except Exception as e:
        raise UserError(f"--detach: the cluster at {api} refused the job: {first_line(e)}") from None
    record = JobRecord(job_id=job_id, name=spec.name, address=api, submitted_at=now(), entrypoint=entrypoint,
                       working_dir=shipped.get("working_dir"), spec=job_spec, experiment=storage.root)
    storage.write_record(layout.JOB_FILE, record)
    if not local_cluster and storage.is_local_path:
        console.print(f"note: the job writes {storage.root} on the cluster's head node; use a storage URI "
                      "(output.dir=s3://...) to read results from here", highlight=False)
    return record


def _ship(spec: JobSpec, spec_path: Path, overrides: List[str]) -> tuple[str, List[str], Dict[str, Any]]:
    """What a remote cluster gets (spec path there, its arguments, runtime_env): the project folder,
    so relative paths in the spec resolve the same way there; or, for a spec outside any project,
    only the resolved spec (absolute paths), never whatever folder it sits in (a home, say)."""
    root = project_root(spec_path.resolve().parent)
    if (root / "pyproject.toml").exists() or (root / ".git").exists():
        excludes = [".git", ".venv", "venv", layout.RUNS_DIR, ".whl", "__pycache__", "*.egg-info", ".pytest_cache",
                    f"{layout.RAY_DIR}/"]
        if not is_uri(spec.output.dir) and Path(spec.output.dir).resolve().is_relative_to(root):
            excludes.append(str(Path(spec.output.dir).resolve().relative_to(root)))
        # The output folder is pinned to what this machine resolved: a URI, or that path on the head.
        return (str(spec_path.resolve().relative_to(root)), [*overrides, f"output.dir={spec.output.dir}"],
                {"working_dir": str(root), "excludes": list(dict.fromkeys(excludes))})
    folder = Path(tempfile.mkdtemp(prefix="qlora-ray-job-"))
    (folder / f"{spec.name}.yaml").write_text(to_yaml(spec), encoding="utf-8")  # overrides applied
    return f"{spec.name}.yaml", [], {"working_dir": str(folder)}


def job_status(record: JobRecord) -> JobState:
    """The job's state now, from the cluster's Jobs API."""
    info = _job_client(record.address).get_job_info(record.job_id)
    return JobState(job_id=record.job_id, status=str(info.status).rsplit(".", 1)[-1], message=info.message,
                    start_time=info.start_time, end_time=info.end_time, address=record.address)


def job_logs(record: JobRecord, follow: bool = False, write: Callable[[str], None] = print) -> None:
    """Print the job's driver log (``follow``: until the job ends)."""
    client = _job_client(record.address)
    if not follow:
        write(client.get_job_logs(record.job_id))
        return
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(record.job_id):
            write(chunk)

    asyncio.run(tail())
