"""The job spec: shipped jobs validate, bad specs fail with exit 2 naming the key, overrides,
inheritance and the trial plan behave as documented."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qlora_ray.cli import app
from qlora_ray.plan import expand
from qlora_ray.spec import SpecError, load_spec, reference_markdown

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted(ROOT.glob("jobs/**/*.yaml"))
runner = CliRunner()


def test_jobs_are_found():
    names = {p.name for p in JOBS}
    assert {"hinglish_r16.yaml", "hinglish_sweep.yaml", "hinglish_smoke.yaml"} <= names


@pytest.mark.parametrize("job", JOBS, ids=[str(p.relative_to(ROOT)) for p in JOBS])
def test_shipped_job_validates(job):
    first = job.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#"), f"{job} must open with a comment: what it runs, the command, overrides"
    result = runner.invoke(app, ["validate", str(job)])
    assert result.exit_code == 0, result.output
    assert "ok:" in result.output


def test_sweep_plan_has_twelve_stable_distinct_trials():
    spec = load_spec(ROOT / "jobs/hinglish_sweep.yaml")
    first, again = expand(spec), expand(load_spec(ROOT / "jobs/hinglish_sweep.yaml"))
    assert len(first) == 12
    ids = [t.id for t in first]
    assert len(set(ids)) == 12
    assert ids == [t.id for t in again]
    assert all(i.startswith("hinglish_sweep-") for i in ids)
    assert {(t.spec.lora.r, t.spec.train.lr) for t in first} == {
        (r, lr) for r in (8, 16, 32, 64) for lr in (1e-4, 2e-4, 3e-4)}
    assert all(t.spec.sweep == {} for t in first)


def test_yaml_and_typed_values_name_the_same_trial(tmp_path):
    """'1e-4' (a YAML string) and 1.0e-4 (a float) give one id: ids come from typed values."""
    a = _write(tmp_path / "a.yaml", _good(tmp_path, sweep={"train.lr": ["1e-4"]}))
    b = _write(tmp_path / "b.yaml", _good(tmp_path, sweep={"train.lr": [1.0e-4]}))
    assert expand(load_spec(a))[0].id == expand(load_spec(b))[0].id


def test_overrides_apply_last_and_parse_types():
    spec = load_spec(ROOT / "jobs/hinglish_r16.yaml", ["train.lr=1e-4", "lora.r=8", "data.packing=false"])
    assert spec.train.lr == pytest.approx(1e-4)
    assert spec.lora.r == 8 and spec.data.packing is False


def test_inheritance_and_relative_paths(tmp_path):
    sub = tmp_path / "nested"
    sub.mkdir()
    (tmp_path / "train.jsonl").write_text("{}\n")
    _write(tmp_path / "base.yaml", {"name": "parent", "model": {"name": "org/model"},
                                    "data": {"train": "train.jsonl", "max_seq_len": 128},
                                    "lora": {"r": 8, "alpha": 16}})
    child = _write(sub / "child.yaml", {"name": "child", "base": "../base.yaml", "lora": {"r": 32}})
    spec = load_spec(child, ["train.lr=3e-4"])
    assert spec.name == "child"
    assert spec.lora.r == 32 and spec.lora.alpha == 16  # child wins, parent fills in
    assert spec.data.max_seq_len == 128
    # A path is relative to the file that wrote it, not to the child or the working directory.
    assert spec.data.train == str(tmp_path / "train.jsonl")
    assert spec.train.lr == pytest.approx(3e-4)


def test_target_modules_accepts_a_single_string(tmp_path):
    spec = load_spec(_write(tmp_path / "s.yaml", _good(tmp_path, lora={"target_modules": "q_proj"})))
    assert spec.lora.target_modules == ["q_proj"]


def test_reference_in_readme_matches_schema():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert reference_markdown() in readme, "README's spec reference is stale: paste `python -m qlora_ray.spec`"


def test_validate_json_output():
    result = runner.invoke(app, ["validate", str(ROOT / "jobs/hinglish_sweep.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data[0]["trials"]) == 12


def test_all_problems_reported_at_once(tmp_path):
    path = _write(tmp_path / "s.yaml", _good(tmp_path, lora={"r": 0, "dropout": 1.5},
                                             train={"lr": 2.0, "batch_sizee": 4}))
    with pytest.raises(SpecError) as e:
        load_spec(path)
    keys = {re.match(r".*?: (\S+):", p).group(1) for p in e.value.problems}
    assert {"lora.r", "lora.dropout", "train.lr", "train.batch_sizee"} <= keys


# ------------------------------------------------------------------ bad specs

def _good(tmp_path: Path, **sections) -> dict:
    (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n')
    spec = {"name": "t", "model": {"name": "org/model"}, "data": {"train": "train.jsonl"}}
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) and key != "sweep" else value
    return spec


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


# (id, spec change, the key path the message must name, a phrase it must contain)
BAD = [
    ("unknown top key", {"modle": {"name": "x"}}, "modle", "did you mean 'model'"),
    ("unknown nested key", {"lora": {"rank": 8}}, "lora.rank", "unknown key"),
    ("misspelt lr", {"train": {"lrr": 1e-4}}, "train.lrr", "did you mean 'train.lr'"),
    ("rank zero", {"lora": {"r": 0}}, "lora.r", ">= 1"),
    ("rank not int", {"lora": {"r": "big"}}, "lora.r", "wrong type"),
    ("lr zero", {"train": {"lr": 0.0}}, "train.lr", "(0, 1)"),
    ("lr one", {"train": {"lr": 1.0}}, "train.lr", "(0, 1)"),
    ("lr text", {"train": {"lr": "fast"}}, "train.lr", "wrong type"),
    ("dropout one", {"lora": {"dropout": 1.0}}, "lora.dropout", "[0, 1)"),
    ("dropout negative", {"lora": {"dropout": -0.1}}, "lora.dropout", "[0, 1)"),
    ("seq len small", {"data": {"max_seq_len": 8}}, "data.max_seq_len", ">= 16"),
    ("missing train data", {"data": {"train": "nope.jsonl"}}, "data.train", "no file matches"),
    ("missing eval data", {"data": {"eval": "nope.jsonl"}}, "data.eval", "no file matches"),
    ("missing prompts", {"eval": {"prompts": "nope.txt"}}, "eval.prompts", "not found"),
    ("bad format", {"data": {"format": "chatml"}}, "data.format", "not one of"),
    ("bad quant", {"quantization": {"mode": "nf3"}}, "quantization.mode", "not one of"),
    ("bad dtype", {"quantization": {"compute_dtype": "fp8"}}, "quantization.compute_dtype", "not one of"),
    ("bf16 on T4", {"quantization": {"compute_dtype": "bf16"},
                    "resources": {"accelerator_type": "T4"}}, "quantization.compute_dtype", "T4"),
    ("sweep not a path", {"sweep": {"lora.rank": [8]}}, "sweep.lora.rank", "did you mean 'lora.r'"),
    ("sweep empty", {"sweep": {"lora.r": []}}, "sweep.lora.r", "at least one"),
    ("sweep wrong type", {"sweep": {"lora.r": ["big"]}}, "sweep.lora.r[0]", "wrong type"),
    ("sweep value out of range", {"sweep": {"train.lr": [1e-4, 5.0]}}, "sweep.train.lr[1]", "(0, 1)"),
    ("sweep not a list", {"sweep": {"lora.r": 8}}, "sweep.lora.r", "list"),
    ("output climbs out", {"output": {"dir": "../../../../../elsewhere"}}, "output.dir", "climbs out"),
    ("batch zero", {"train": {"batch_size": 0}}, "train.batch_size", ">= 1"),
    ("warmup one", {"train": {"warmup_ratio": 1.0}}, "train.warmup_ratio", "[0, 1)"),
    ("bad scheduler", {"train": {"scheduler": "step"}}, "train.scheduler", "not one of"),
    ("bad checkpointing", {"train": {"gradient_checkpointing": "sometimes"}}, "train.gradient_checkpointing", "not one of"),
    ("negative gpus", {"resources": {"gpus_per_trial": -1}}, "resources.gpus_per_trial", ">= 0"),
    ("bad runner", {"resources": {"runner": "fast"}}, "resources.runner", "not one of train, tune"),
    ("section not mapping", {"lora": 16}, "lora", "mapping"),
    ("name with slash", {"name": "a/b"}, "name", "slashes"),
    ("interpolation", {"model": {"name": "${oc.env:HF_TOKEN}"}}, "model.name", "interpolation"),
    ("null name", {"name": None}, "name", "must not be null"),
    ("eval fraction one", {"data": {"eval_fraction": 1.0}}, "data.eval_fraction", "[0, 1)"),
    ("max steps zero", {"train": {"max_steps": 0}}, "train.max_steps", ">= 1"),
    # Numbers: finite, and within bounds that every library downstream accepts.
    ("epochs nan", {"train": {"epochs": float("nan")}}, "train.epochs", "finite"),
    ("epochs inf", {"train": {"epochs": float("inf")}}, "train.epochs", "finite"),
    ("max_grad_norm nan", {"train": {"max_grad_norm": float("nan")}}, "train.max_grad_norm", "finite"),
    ("lr nan", {"train": {"lr": float("nan")}}, "train.lr", "finite"),
    ("data seed negative", {"data": {"seed": -1}}, "data.seed", "[0, 4294967295]"),
    ("train seed 1e20", {"train": {"seed": 10**20}}, "train.seed", "<= 4,294,967,295"),
    ("rank 1e30", {"lora": {"r": 10**30}}, "lora.r", "<= 4,096"),
    ("max steps huge", {"train": {"max_steps": 10**19}}, "train.max_steps", "<= 2,147,483,647"),
    ("swept rank huge", {"sweep": {"lora.r": [8, 10**30]}}, "sweep.lora.r[1]", "<= 4,096"),
    ("swept epochs nan", {"sweep": {"train.epochs": [1.0, float("nan")]}}, "sweep.train.epochs[1]", "finite"),
    # Names: they name folders and Ray runs.
    ("name with NUL", {"name": "a\0b"}, "name", "control character"),
    ("name over 255 bytes", {"name": "x" * 256}, "name", "bytes"),
    ("name long with the sweep suffix", {"name": "x" * 198, "sweep": {"lora.r": [8, 16]}}, "name", "sweep suffix"),
    # output.dir must be a folder that can be written.
    ("output is a file", {"output": {"dir": "train.jsonl"}}, "output.dir", "is a file"),
    ("output under a file", {"output": {"dir": "train.jsonl/runs"}}, "output.dir", "is a file"),
    # Plans: a limit on their size, and no trial twice.
    ("sweep of 10,000 trials", {"sweep": {"lora.r": list(range(1, 101)), "train.seed": list(range(100))}},
     "sweep", "over resources.max_trials (1,000)"),
    ("sweep over a lowered max_trials", {"resources": {"max_trials": 4},
                                         "sweep": {"lora.r": [4, 8, 16], "train.lr": [1e-4, 2e-4]}},
     "sweep", "over resources.max_trials (4)"),
    ("max_trials zero", {"resources": {"max_trials": 0}}, "resources.max_trials", ">= 1"),
    ("sweep lists one value twice as typed", {"sweep": {"train.lr": [1.0e-4, "1e-4"]}}, "sweep.train.lr[1]", "twice"),
    ("swept train file missing", {"sweep": {"data.train": ["train.jsonl", "nope.jsonl"]}},
     "sweep.data.train[1]", "no file matches"),
]


@pytest.mark.parametrize("change,key,phrase", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_spec_exits_2_naming_the_key(tmp_path, change, key, phrase):
    spec = _good(tmp_path, **{k: v for k, v in change.items() if k != "name"})
    if "name" in change:
        spec["name"] = change["name"]
    path = _write(tmp_path / "bad.yaml", spec)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if f": {key}: " in l]
    assert lines, f"no line names {key}:\n{result.output}"
    assert any(phrase in l for l in lines), result.output
    assert any(str(path) in l for l in lines), "the message must name the file"
    assert "Traceback" not in result.output


def test_bad_spec_count():
    assert len(BAD) >= 25


@pytest.mark.parametrize("text,phrase", [
    ("name: [unclosed", "not valid YAML"),
    ("- just\n- a list\n", "mapping"),
    ("!!python/object/apply:os.system ['echo pwned']", "not valid YAML"),
])
def test_unparseable_files(tmp_path, text, phrase):
    path = _write(tmp_path / "bad.yaml", text)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert phrase in result.output and str(path) in result.output


def test_missing_file_and_bad_override(tmp_path):
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "not found" in result.output
    good = _write(tmp_path / "g.yaml", _good(tmp_path))
    result = runner.invoke(app, ["validate", str(good), "lora.r=zero"])
    assert result.exit_code == 2 and "command line: lora.r: wrong type" in result.output


def test_base_loop_and_missing_base(tmp_path):
    _write(tmp_path / "a.yaml", {"name": "a", "base": "b.yaml"})
    _write(tmp_path / "b.yaml", {"name": "b", "base": "a.yaml"})
    result = runner.invoke(app, ["validate", str(tmp_path / "a.yaml")])
    assert result.exit_code == 2 and "loops" in result.output
    _write(tmp_path / "c.yaml", {"name": "c", "base": "missing.yaml"})
    result = runner.invoke(app, ["validate", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2 and "base" in result.output and "not found" in result.output


def test_absolute_output_and_uri_are_allowed(tmp_path):
    for out in (str(tmp_path / "elsewhere"), "s3://bucket/runs"):
        spec = load_spec(_write(tmp_path / "s.yaml", _good(tmp_path, output={"dir": out})))
        assert spec.output.dir == out


# ------------------------------------------------------------------ hostile input

def _alias_bomb(levels: int = 9, inside_sweep: bool = False) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    # Anchors are defined inside a value the schema would reject anyway; the alias is what is used.
    body = "\n".join("  " + line for line in lines)
    use = f"sweep:\n  lora.target_modules: *a{levels - 1}\n" if inside_sweep else f"eval: {{prompts: *a{levels - 1}}}\n"
    return f"name: t\nmodel: {{name: org/model}}\ndata: {{train: train.jsonl}}\nunused:\n{body}\n{use}"


@pytest.mark.parametrize("inside_sweep", [False, True], ids=["top", "sweep"])
def test_yaml_alias_bomb_is_refused_at_once(tmp_path, inside_sweep):
    """A 9-level alias bomb (9**9 strings once expanded) is refused, with a short message."""
    _good(tmp_path)
    text = _alias_bomb(inside_sweep=inside_sweep)
    assert len(text) < 1000
    path = _write(tmp_path / "bomb.yaml", text)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output[:2000]
    assert "aliases (*a0) are not allowed" in result.output and str(path) in result.output
    assert len(result.output) < 1000


def test_alias_in_an_override_is_not_expanded(tmp_path):
    path = _write(tmp_path / "s.yaml", _good(tmp_path))
    result = runner.invoke(app, ["validate", str(path), "lora.target_modules=[&x q_proj, *x]"])
    assert result.exit_code == 2 and "command line: lora.target_modules: aliases (*x) are not allowed" in result.output


def test_duplicate_keys_are_refused_naming_each(tmp_path):
    _good(tmp_path)
    text = ("name: t\nmodel: {name: org/model}\ndata: {train: train.jsonl}\n"
            "train:\n  lr: 1.0e-4\n  epochs: 2\n  lr: 3.0e-4\nsweep:\n  lora.r: [8]\n  lora.r: [16]\n")
    result = runner.invoke(app, ["validate", str(_write(tmp_path / "dup.yaml", text))])
    assert result.exit_code == 2, result.output
    assert "dup.yaml: train.lr: duplicate key (line 7; first on line 5)" in result.output
    assert "dup.yaml: sweep.lora.r: duplicate key" in result.output


def test_a_huge_value_is_not_echoed_whole(tmp_path):
    spec = _good(tmp_path, lora={"r": "9" * 200_000 + "x"}, data={"format": "y" * 200_000})
    spec["z" * 100_000] = 1
    result = runner.invoke(app, ["validate", str(_write(tmp_path / "huge.yaml", spec))])
    assert result.exit_code == 2
    for key in ("lora.r: wrong type", "data.format:", "unknown key"):
        assert key in result.output
    assert len(result.output) < 3000, len(result.output)


def test_spec_that_is_not_utf8_is_named(tmp_path):
    _good(tmp_path)
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: café\nmodel: {name: org/model}\ndata: {train: train.jsonl}\n".encode("latin-1"))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert f"{path}: is not UTF-8 text (byte 0xe9 on line 1); save it as UTF-8" in result.output
    assert "Traceback" not in result.output


def test_spec_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(_good(tmp_path)).encode("utf-8"))
    assert load_spec(path).name == "t"


def test_base_on_the_command_line_is_refused(tmp_path):
    _write(tmp_path / "parent.yaml", _good(tmp_path, lora={"r": 64}))
    path = _write(tmp_path / "s.yaml", _good(tmp_path))
    result = runner.invoke(app, ["validate", str(path), "base=parent.yaml"])
    assert result.exit_code == 2, result.output
    assert "command line: base: cannot be given as an override" in result.output


def test_swept_paths_are_relative_to_the_spec_and_checked(tmp_path, monkeypatch):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (jobs / name).write_text('{"text": "hi"}\n')
    path = _write(jobs / "s.yaml", {"name": "t", "model": {"name": "org/model"}, "data": {"train": "a.jsonl"},
                                    "sweep": {"data.train": ["a.jsonl", "b.jsonl"]}})
    monkeypatch.chdir(tmp_path)  # not the spec's folder
    trials = expand(load_spec(path))
    assert [t.spec.data.train for t in trials] == [str(jobs / "a.jsonl"), str(jobs / "b.jsonl")]
    assert [t.id for t in trials] == ["t-traina.jsonl", "t-trainb.jsonl"]


def test_empty_data_files_fail_validate(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    for key in ("train", "eval"):
        path = _write(tmp_path / "s.yaml", _good(tmp_path, data={key: "empty.jsonl"}))
        result = runner.invoke(app, ["validate", str(path)])
        assert result.exit_code == 2, result.output
        assert f"s.yaml: data.{key}: '{tmp_path / 'empty.jsonl'}' is empty" in result.output


def test_read_only_output_dir_fails_validate(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    target = locked / "runs"
    if os.access(locked, os.W_OK):
        # Permission bits do not bind root; /proc/sys refuses writes to everyone.
        if os.access("/proc/sys", os.W_OK) or not os.path.isdir("/proc/sys"):
            pytest.skip("no read-only folder for this user")
        target = Path("/proc/sys/qlora-ray-runs")
    path = _write(tmp_path / "s.yaml", _good(tmp_path, output={"dir": str(target)}))
    result = runner.invoke(app, ["validate", str(path)])
    locked.chmod(0o755)
    assert result.exit_code == 2, result.output
    assert f"s.yaml: output.dir: '{target}' cannot be created" in result.output
    assert "not writable" in result.output


def test_max_trials_in_the_spec_raises_the_limit(tmp_path):
    sweep = {"lora.r": list(range(1, 41)), "train.seed": list(range(30))}
    path = _write(tmp_path / "s.yaml", {**_good(tmp_path), "sweep": sweep})
    with pytest.raises(SpecError, match="plans 1,200 trials .* over resources.max_trials"):
        load_spec(path)
    trials = expand(load_spec(path, ["resources.max_trials=1200"]))
    assert len(trials) == len({t.id for t in trials}) == 1200
    assert all(t.spec.sweep == {} for t in trials)
