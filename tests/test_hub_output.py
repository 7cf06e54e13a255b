"""``output.dir`` on the Hugging Face Hub (``hf://datasets/<user>/<repo>``): the run works in a
local staging folder mirrored to the Hub, and the next session resumes from the Hub's copy.

The Hub cannot be reached from the machines these tests run on, so a local folder stands in for
it: an fsspec filesystem registered under the ``hf`` protocol (``fake_hub.FakeHub``, a
``DirFileSystem`` over a temp folder) takes the place of huggingface_hub's ``HfFileSystem``.
Everything else is real: the CLI, the tiny model's QLoRA training, its checkpoints, a local Ray for
``submit``, and the resume. The one test that uses the real ``HfFileSystem`` needs no network (a
missing token is found before any call).
"""

from __future__ import annotations

import json
from pathlib import Path

import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import fake_hub
from conftest import write_tiny_spec
from qlora_ray import layout
from qlora_ray.cli import app
from qlora_ray.spec import SpecError, load_spec

HUB_DIR = "hf://datasets/me/runs/sweeps"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in Hub (its folder), the dataset repo ``me/runs`` created, and a fresh staging root."""
    root = tmp_path / "hub"
    (root / "datasets/me/runs").mkdir(parents=True)
    fake_hub.install(root)
    monkeypatch.setattr(layout, "HUB_STAGING", tmp_path / "staging-1")
    yield root
    fake_hub.uninstall()


def _train(spec: Path, *overrides: str):
    return CliRunner().invoke(app, ["train", str(spec), f"output.dir={HUB_DIR}", *overrides, "--quiet"])


def _steps(metrics: Path) -> list:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]


def test_the_mirror_sends_what_changed_and_fetches_what_the_hub_holds(tmp_path, hub):
    from qlora_ray.mirror import Mirror

    uri = f"{HUB_DIR}/exp"
    remote = hub / "datasets/me/runs/sweeps/exp"
    a = tmp_path / "machine-a" / "exp"
    (a / "t1/checkpoints/step_1").mkdir(parents=True)
    (a / "t1/checkpoints/step_1/manifest.json").write_text("{}")
    (a / "t1/checkpoints/step_1/state.json").write_text("{}")
    (a / "t1/metrics.jsonl").write_text('{"step": 1}\n')
    (a / "t1/checkpoints/.step_2.tmp").mkdir()  # a checkpoint being written: not sent
    (a / "t1/checkpoints/.step_2.tmp/state.json").write_text("{}")
    (a / "_ray/train").mkdir(parents=True)       # Ray's own state: not sent
    (a / "_ray/train/state.pkl").write_text("x")
    (a / "best").symlink_to("t1")
    mirror_a = Mirror(uri, a)
    assert mirror_a.pull() == 0
    assert mirror_a.push() == 4  # three files and best.txt
    assert sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()) == [
        ".qlora-ray-sync.json", "best.txt", "t1/checkpoints/step_1/manifest.json",
        "t1/checkpoints/step_1/state.json", "t1/metrics.jsonl"]
    assert (remote / "best.txt").read_text() == "t1\n"
    assert mirror_a.push() == 0  # nothing changed, nothing sent

    # Machine B: a fresh staging folder gets the Hub's copy, trains on, rotates a checkpoint out.
    b = tmp_path / "machine-b" / "exp"
    mirror_b = Mirror(uri, b)
    assert mirror_b.pull() == 4  # the files (the sync marker aside)
    (b / "t1/metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    shutil.rmtree(b / "t1/checkpoints/step_1")
    (b / "t1/checkpoints/step_2").mkdir()
    (b / "t1/checkpoints/step_2/manifest.json").write_text("{}")
    assert mirror_b.push() == 2
    assert not list((remote / "t1/checkpoints").glob("step_1/*"))
    assert (remote / "t1/checkpoints/step_2/manifest.json").is_file()

    # Machine A again: its folder is stale (the Hub moved on), so it is fetched afresh.
    assert Mirror(uri, a).pull() == 3
    assert (a / "t1/metrics.jsonl").read_text().count("step") == 2
    assert not (a / "t1/checkpoints/step_1").exists() and not (a / "_ray").exists()
    # Machine B again: its folder holds the Hub's last push (or newer): kept as it is.
    (b / "t1/metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    mirror_b = Mirror(uri, b)
    assert mirror_b.pull() == 0 and (b / "t1/metrics.jsonl").read_text().count("step") == 3
    assert mirror_b.push() == 1  # the newer metrics go up

    moved = mirror_b.move_aside()  # --fresh: the Hub's copy renamed, never deleted
    assert moved.startswith(f"{uri}.old-") and not remote.exists() and not b.exists()
    assert (hub / moved[len("hf://"):] / "t1/metrics.jsonl").is_file()


def test_spec_accepts_a_hub_folder_and_refuses_other_schemes(tmp_path, tiny_model_dir, tiny_data_dir):
    spec_file = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir)
    assert load_spec(spec_file, [f"output.dir={HUB_DIR}"]).experiment_dir == f"{HUB_DIR}/tiny"
    assert load_spec(spec_file, ["output.dir=hf://buckets/me/b"]).output.dir == "hf://buckets/me/b"
    for bad, words in (("hf://me/a-model", "hf://datasets/<user>/<repo>"),
                       ("ftp://host/runs", "unknown storage scheme 'ftp://'")):
        with pytest.raises(SpecError) as e:
            load_spec(spec_file, [f"output.dir={bad}"])
        assert "output.dir" in str(e.value) and words in str(e.value)


def test_a_missing_token_is_a_clear_error(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    """The real HfFileSystem: without a token, validate stops before any network call."""
    from huggingface_hub import constants

    fake_hub.uninstall()
    from huggingface_hub import HfFileSystem
    import fsspec.core

    assert isinstance(fsspec.core.url_to_fs(HUB_DIR)[0], HfFileSystem)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    spec_file = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir)
    for command in (["validate", str(spec_file), f"output.dir={HUB_DIR}", "-q"],
                    ["train", str(spec_file), f"output.dir={HUB_DIR}", "--quiet"]):
        out = CliRunner().invoke(app, command)
        assert out.exit_code == 2, out.output
        text = " ".join(out.output.split())
        assert "output.dir" in text and "HF_TOKEN" in text and "hf auth login" in text


def test_a_repo_that_does_not_exist_is_a_clear_error(tmp_path, tiny_model_dir, tiny_data_dir, hub):
    spec_file = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir)
    for command in (["validate", str(spec_file), "output.dir=hf://datasets/me/nothing", "-q"],
                    ["train", str(spec_file), "output.dir=hf://datasets/me/nothing", "--quiet"]):
        out = CliRunner().invoke(app, command)
        assert out.exit_code == 2, out.output
        text = " ".join(out.output.split())
        assert "output.dir" in text and "'me/nothing' does not exist" in text
        assert "hf repos create me/nothing --repo-type dataset" in text
    assert not (hub / "datasets/me/nothing").exists() and not layout.HUB_STAGING.exists()


def test_train_writes_the_hub_and_a_fresh_session_resumes_from_it(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                  hub, monkeypatch):
    spec_file = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir,
                                train="{max_steps: 2, checkpoint_every: 1, batch_size: 4, gradient_checkpointing: false}")
    first = _train(spec_file)
    assert first.exit_code == 0, first.output
    remote = hub / "datasets/me/runs/sweeps/tiny"
    trial = next(p for p in remote.iterdir() if p.is_dir())
    assert (trial / layout.ADAPTER_DIR / layout.ADAPTER_WEIGHTS).is_file()
    assert (trial / layout.RESULT_FILE).is_file()
    assert (trial / layout.CHECKPOINTS_DIR / "step_2" / layout.MANIFEST_FILE).is_file()
    assert _steps(trial / layout.METRICS_FILE) == [1, 2]
    assert not (tmp_path / "runs").exists()  # nothing written where a local output.dir would be

    # The next session: another machine, an empty staging folder; only the Hub's copy is left.
    monkeypatch.setattr(layout, "HUB_STAGING", tmp_path / "staging-2")
    second = _train(spec_file, "train.max_steps=4")
    assert second.exit_code == 0, second.output
    text = " ".join(second.output.split())
    assert "resuming from" in text and "step_2" in text
    assert _steps(trial / layout.METRICS_FILE) == [1, 2, 3, 4]  # no step trained twice, none skipped
    assert (trial / layout.CHECKPOINTS_DIR / "step_4" / layout.MANIFEST_FILE).is_file()
    # The leaderboard of the Hub's experiment, read and written back through the Hub.
    board = CliRunner().invoke(app, ["results", f"{HUB_DIR}/tiny", "--json"])
    assert board.exit_code == 0, board.output
    assert (remote / layout.leaderboard_file("md")).is_file()
    assert trial.name in (remote / layout.leaderboard_file("md")).read_text()


def _submit(hub: Path, staging: Path, spec: Path, *args: str) -> subprocess.CompletedProcess:
    """``qlora-ray submit`` in a fresh process (its own local Ray) with the stand-in Hub installed."""
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(Path(__file__).with_name("fake_hub.py")), str(hub), str(staging),
                           str(spec), f"output.dir={HUB_DIR}", "--no-dashboard", *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=spec.parent)


@pytest.mark.ray
def test_a_sweep_out_of_time_resumes_from_the_hub_in_a_fresh_session(tmp_path, tiny_model_dir, tiny_data_dir, hub):
    """Session 1 spends its time budget (1 s: each trial trains its one guaranteed step, checkpoints
    and stops); session 2, on an empty staging folder, finishes from the Hub's copy."""
    spec_file = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir,
                                train="{max_steps: 3, batch_size: 4, log_every: 1, gradient_checkpointing: false}")
    first = _submit(hub, tmp_path / "staging-1", spec_file, "resources.time_budget=1s")
    assert first.returncode == 3, first.stdout + first.stderr[-4000:]
    remote = hub / "datasets/me/runs/sweeps/tiny"
    assert json.loads((remote / "leaderboard.json").read_text())["trials"][0]["status"] == "stopped"
    assert _steps(remote / "tiny" / layout.METRICS_FILE) == [1]
    assert (remote / "tiny" / layout.CHECKPOINTS_DIR / "step_1" / layout.MANIFEST_FILE).is_file()
    assert not (remote / layout.RAY_DIR).exists()  # Ray's own state stays in the staging folder

    again = _submit(hub, tmp_path / "staging-2", spec_file)
    assert again.returncode == 0, again.stdout + again.stderr[-4000:]
    board = json.loads((remote / "leaderboard.json").read_text())
    assert [t["status"] for t in board["trials"]] == ["finished"]
    assert _steps(remote / "tiny" / layout.METRICS_FILE) == [1, 2, 3]  # no step twice, none skipped
    starts = [json.loads(line) for line in (remote / "tiny" / layout.EVENTS_FILE).read_text().splitlines()]
    assert len(starts) == 2 and "staging-2" in starts[1]["resume_from"]
    assert (remote / "tiny" / layout.ADAPTER_DIR / layout.ADAPTER_WEIGHTS).is_file()
    assert (remote / layout.BEST_FILE).read_text().strip() == "tiny"


def test_a_push_to_the_hub_is_one_commit(tmp_path, monkeypatch):
    """The Hub's API is replaced by a recorder (the Hub cannot be reached here): one push of a repo
    folder is one commit, its paths under the folder, a checkpoint's manifest after its files, the
    sync marker last; a bucket gets one batch."""
    import huggingface_hub
    from huggingface_hub.hf_file_system import HfFileSystemResolvedBucketPath, HfFileSystemResolvedRepositoryPath

    from qlora_ray.mirror import _hub_commit

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda self, **kw: calls.append(("commit", kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "batch_bucket_files",
                        lambda self, bucket, **kw: calls.append(("batch", bucket, kw)))

    class Resolved:
        def __init__(self, resolved):
            self.resolved, self.invalidated = resolved, []

        def resolve_path(self, path):
            return self.resolved

        def invalidate_cache(self, path):
            self.invalidated.append(path)

    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "state.json").write_text("{}")
    adds = [(tmp_path / "state.json", "t/checkpoints/step_2/state.json"),
            (tmp_path / "manifest.json", "t/checkpoints/step_2/manifest.json")]
    repo = Resolved(HfFileSystemResolvedRepositoryPath(repo_type="dataset", repo_id="me/runs", revision="main",
                                                       path_in_repo="sweeps/exp"))
    _hub_commit(repo, "datasets/me/runs/sweeps/exp", adds, ["t/checkpoints/step_1/state.json"], "{}\n")
    kind, kw = calls.pop()
    assert kind == "commit" and kw["repo_id"] == "me/runs" and kw["repo_type"] == "dataset"
    assert [(type(op).__name__, op.path_in_repo) for op in kw["operations"]] == [
        ("CommitOperationAdd", "sweeps/exp/t/checkpoints/step_2/state.json"),
        ("CommitOperationAdd", "sweeps/exp/t/checkpoints/step_2/manifest.json"),
        ("CommitOperationDelete", "sweeps/exp/t/checkpoints/step_1/state.json"),
        ("CommitOperationAdd", f"sweeps/exp/{layout.SYNC_FILE}")]
    assert repo.invalidated == ["datasets/me/runs/sweeps/exp"]

    bucket = Resolved(HfFileSystemResolvedBucketPath(bucket_id="me/b", path="exp"))
    _hub_commit(bucket, "buckets/me/b/exp", adds, [], "{}\n")
    kind, name, kw = calls.pop()
    assert kind == "batch" and name == "me/b" and kw["delete"] is None
    assert [dest for _, dest in kw["add"]] == ["exp/t/checkpoints/step_2/state.json",
                                               "exp/t/checkpoints/step_2/manifest.json", f"exp/{layout.SYNC_FILE}"]
