"""The trial plan: ids exact, readable, unique and stable; a plan that cannot be run is a spec error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qlora_ray.cli import app
from qlora_ray.plan import expand, trial_ids
from qlora_ray.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _spec(tmp_path: Path, sweep: dict, name: str = "t"):
    (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n')
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": name, "model": {"name": "org/model"},
                                    "data": {"train": "train.jsonl"}, "sweep": sweep}), encoding="utf-8")
    return path


def test_shipped_sweep_keeps_its_ids():
    """Values that printed exactly before print the same now, so earlier runs still resume."""
    ids = [t.id for t in expand(load_spec(ROOT / "jobs/hinglish_sweep.yaml"))]
    assert ids[:3] == ["hinglish_sweep-r8_lr1e-4", "hinglish_sweep-r8_lr2e-4", "hinglish_sweep-r8_lr3e-4"]
    assert ids[-1] == "hinglish_sweep-r64_lr3e-4"


@pytest.mark.parametrize("key,values,expected", [
    ("train.lr", [1.0e-4, 1.4e-4], ["lr1e-4", "lr1.4e-4"]),
    ("train.lr", [2.0e-4, 2.4e-4, 1.6e-4], ["lr2e-4", "lr2.4e-4", "lr1.6e-4"]),
    ("lora.dropout", [0.1, 0.10000001], ["dropout0.1", "dropout0.10000001"]),
    ("train.lr", [1.23456789e-5, 1.2345679e-5], ["lr1.23456789e-5", "lr1.2345679e-5"]),
    ("train.epochs", [1.0, 2.5], ["epochs1", "epochs2.5"]),
], ids=["lr 1e-4 vs 1.4e-4", "three lrs around 2e-4", "dropout 0.1 vs 0.10000001", "lr 9 digits", "epochs"])
def test_close_values_get_exact_distinct_ids(tmp_path, key, values, expected):
    trials = expand(load_spec(_spec(tmp_path, {key: values})))
    assert [t.id for t in trials] == [f"t-{e}" for e in expected]
    assert [t.values[key] for t in trials] == values
    assert [t.id for t in trials] == trial_ids(load_spec(_spec(tmp_path, {key: values})))


def test_values_alike_once_made_safe_get_a_hash(tmp_path):
    """'org/a' and 'org_a' both read 'org_a' in a folder name: each gets a short hash of itself."""
    trials = expand(load_spec(_spec(tmp_path, {"model.name": ["org/a", "org_a", "org/b"]})))
    ids = [t.id for t in trials]
    assert len(set(ids)) == 3
    assert ids[0].startswith("t-nameorg_a-") and ids[1].startswith("t-nameorg_a-") and ids[2] == "t-nameorg_b"
    assert [t.spec.model.name for t in trials] == ["org/a", "org_a", "org/b"]


def test_long_values_are_cut_and_hashed(tmp_path):
    names = ["org/" + "m" * 80 + "-v1", "org/" + "m" * 80 + "-v2"]
    ids = [t.id for t in expand(load_spec(_spec(tmp_path, {"model.name": names})))]
    assert len(set(ids)) == 2 and all(len(i) < 60 for i in ids)


def test_ids_that_still_collide_are_a_spec_error(tmp_path):
    """Two keys whose value texts run together the same way make one id twice."""
    path = _spec(tmp_path, {"model.name": ["a_revisionb", "a"], "model.revision": ["c", "b_revisionc"]})
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert f"{path}: sweep: trials 0 and 3 would both be 't-namea_revisionb_revisionc'" in result.output
    with pytest.raises(SpecError):
        load_spec(path)


def test_trials_share_nothing_mutable(tmp_path):
    trials = expand(load_spec(_spec(tmp_path, {"lora.r": [8, 16]})))
    trials[0].spec.lora.target_modules.append("q_proj")
    assert trials[1].spec.lora.target_modules == ["all-linear"]
    assert all(t.spec.sweep == {} for t in trials)
