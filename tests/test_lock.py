"""Two runs of one experiment at once are refused: ``train`` and ``submit`` hold a lock beside the
experiment folder (a real file lock, held here by the test as another run would hold it)."""

from __future__ import annotations

from typer.testing import CliRunner

from qlora_ray.cli import app
from qlora_ray.lock import experiment_lock


def test_a_second_run_of_an_experiment_is_refused(tiny_spec_file):
    runs = tiny_spec_file.parent / "runs"
    runner = CliRunner()
    with experiment_lock(runs / "tiny", "qlora-ray submit tiny.yaml"):
        for command in (["train", str(tiny_spec_file), "--quiet"], ["submit", str(tiny_spec_file), "--no-dashboard"]):
            refused = runner.invoke(app, command)
            assert refused.exit_code == 2, refused.output
            text = refused.output.replace("\n", " ")
            assert "experiment 'tiny' is already being run (qlora-ray submit tiny.yaml, pid" in text
            assert not (runs / "tiny").exists()  # nothing started
    assert not (runs / ".tiny.lock.owner").exists()
