"""Per-trial gauges on the local node's Prometheus endpoint (what the Ray dashboard's Metrics view
and any Prometheus read), scraped while a real CPU sweep runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from qlora_ray.runtime.metrics import GAUGES


def _metrics_port(session: Path) -> int | None:
    for path in session.glob("metrics_export_port_*"):
        text = path.read_text().strip()
        if text.isdigit():
            return int(text)
    return None


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode("utf-8", "replace")


@pytest.mark.ray
def test_trial_gauges_appear_on_the_node_metrics_endpoint_during_a_sweep(tiny_spec_file):
    env = {**os.environ, "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    # Enough steps that the trials are still training when the endpoint is read (Ray exports
    # user metrics every few seconds); the scrape loop ends as soon as every gauge is seen.
    proc = subprocess.Popen(
        [sys.executable, "-m", "qlora_ray", "submit", str(tiny_spec_file), "sweep={lora.r: [2, 4]}",
         "train.max_steps=400", "train.checkpoint_every=1000", "train.log_every=5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tiny_spec_file.parent)
    session, seen, text, lines = None, set(), "", []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ray logs: "):
                session = Path(line.split()[2]).parent
                break
        assert session is not None, "".join(lines)
        deadline = time.time() + 400
        # The eval perplexity is set once a trial has finished (no periodic eval here); the run is
        # stopped before that, so it is not looked for.
        wanted = {(name, tid) for name in GAUGES for tid in ("tiny-r2", "tiny-r4") if name != "qlora_ray_eval_ppl"}
        while proc.poll() is None and time.time() < deadline and not wanted <= seen:
            port = _metrics_port(session)
            if port:
                try:
                    text = _scrape(port)
                except OSError:
                    text = ""
                for name, tid in wanted:
                    if any(name in ln and f'trial_id="{tid}"' in ln and 'job="tiny"' in ln
                           for ln in text.splitlines() if not ln.startswith("#")):
                        seen.add((name, tid))
            time.sleep(2)
        assert wanted <= seen, f"missing {sorted(wanted - seen)}\n{text[-3000:]}"
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: submit stops its trials and its Ray
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=60)
