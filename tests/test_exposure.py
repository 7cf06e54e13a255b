"""Warnings before a run reaches beyond this machine: ``--detach`` names the files it uploads
that look like secrets (unless git ignores them) and what it leaves out; a dashboard on every
interface, or a cluster that takes clients without a token, is called out. Real files, a real
git, real HTTP servers (a dashboard API that answers, and one that wants a token); no Ray."""

from __future__ import annotations

import http.server
import subprocess
import threading

import pytest

from qlora_ray.runtime.exposure import exposure_notes, requires_token
from qlora_ray.runtime.upload import secret_like_files, upload_notes


def test_detach_upload_names_secret_like_files_unless_gitignored(tmp_path):
    root = tmp_path / "project"
    (root / "jobs").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname='x'\n")
    for rel in (".env", "hf_token.txt", "jobs/job.yaml", "keys/server.pem", "ignored_secret.txt",
                ".venv/lib/token.py", "runs/exp/api_key.json", "model/tokenizer_config.json",
                "model/special_tokens_map.json", "qlora_ray/tokens.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    (root / ".gitignore").write_text("ignored_secret.txt\n")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    excludes = [".git", ".venv", "runs"]
    assert secret_like_files(root, excludes) == [".env", "hf_token.txt", "keys/server.pem"]
    notes = upload_notes(root, excludes)
    assert notes[0] == f"uploading {root} to the cluster, without: .git, .venv, runs (and what .gitignore lists)"
    assert notes[1].startswith("warning: the upload includes files that look like secrets: .env, hf_token.txt, "
                               "keys/server.pem.")
    (root / ".env").unlink()
    (root / "hf_token.txt").unlink()
    (root / "keys/server.pem").unlink()
    assert len(upload_notes(root, excludes)) == 1


class _Api(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture(params=[200, 401])
def dashboard(request):
    handler = type("Api", (_Api,), {"status": request.param})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", request.param
    server.shutdown()


def test_a_cluster_without_token_auth_is_called_out(dashboard, monkeypatch):
    url, status = dashboard
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert requires_token(url) is (status == 401)
    notes = exposure_notes("10.0.0.5:6379", "127.0.0.1", url)
    if status == 200:
        assert len(notes) == 1 and "accepts clients without a token" in notes[0] and "10.0.0.5:6379" in notes[0]
    else:
        assert notes == []


def test_a_dashboard_on_every_interface_is_called_out(monkeypatch):
    notes = exposure_notes(None, "0.0.0.0", "http://0.0.0.0:8265")
    assert len(notes) == 1 and notes[0].startswith("warning: --dashboard-host 0.0.0.0:")
    assert exposure_notes(None, "127.0.0.1", "http://127.0.0.1:8265") == []
    # No dashboard to ask, and this client holds no token: the head took us without one.
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert "without a token" in exposure_notes("10.0.0.5:6379", "127.0.0.1", None)[0]
