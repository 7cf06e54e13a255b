"""Data preparation on real tokenizers: formats, labels, bad rows, sources, cache, packing, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import datasets
import pytest
import torch
from conftest import CHATML, TINY_CHATS, tiny_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from qlora_ray.cli import app
from qlora_ray.data import (IGNORE, PreparedData, eval_batches, locate_row, prepare, render_example,
                            train_batches)
from qlora_ray.data import cache as data_cache
from qlora_ray.data.batches import collate_padded
from qlora_ray.errors import UserError
from qlora_ray.spec import DataSpec

END = "<|im_end|>"
# TinyLlama-1.1B-Chat-v1.0's own template (Zephyr style).
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
# SmolLM2's template: it injects a default system prompt, but only once a message exists.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def spec_for(tmp_path: Path, train, **overrides) -> DataSpec:
    """A DataSpec over ``train`` with its own cache; no held-out split unless asked."""
    values = dict(train=str(train), cache_dir=str(tmp_path / "cache"), max_seq_len=128, eval_fraction=0.0)
    values.update(overrides)
    return DataSpec(**values)


def target_runs(example, tokenizer) -> List[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE:
            assert label == token
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def replies(chat) -> List[str]:
    return [content for role, content in chat if role == "assistant"]


# ---------------------------------------------------------------- formats and labels

def _rows(fmt: str) -> tuple[list, list]:
    """Rows of ``fmt`` built from the tiny chats, and the replies each must train on."""
    chats = TINY_CHATS if fmt in ("messages", "sharegpt") else [c for c in TINY_CHATS if len(c) == 2]
    if fmt == "messages":
        rows = tiny_rows()
    elif fmt == "sharegpt":
        speaker = {"user": "human", "assistant": "gpt"}
        rows = [{"conversations": [{"from": speaker[r], "value": c} for r, c in chat]} for chat in chats]
    elif fmt == "alpaca":
        rows = [{"instruction": chat[0][1], "input": "" if i % 2 else "context", "output": chat[1][1]}
                for i, chat in enumerate(chats)]
    else:
        rows = [{"prompt": chat[0][1], "response": chat[1][1]} for chat in chats]
    return rows, [replies(chat) for chat in chats]


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca", "prompt_response"])
@pytest.mark.parametrize("named", [False, True], ids=["auto", "named"])
def test_labels_cover_exactly_the_assistant_replies_and_end_token(tmp_path, tok, fmt, named):
    rows, expected = _rows(fmt)
    fmt_name = "messages" if fmt == "sharegpt" else fmt
    spec = spec_for(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), format=fmt_name if named else "auto")
    prepared = prepare(spec, tok)
    assert prepared.train_stats.examples == len(rows) and not prepared.train_stats.skipped
    assert prepared.train_stats.formats == {fmt: len(rows)}
    for example, reply_texts in zip(prepared.train, expected):
        assert target_runs(example, tok) == [r + END for r in reply_texts]
        # The tokens are those of the template's full render, as inference would tokenize it.
        text = tok.decode(example.input_ids, skip_special_tokens=False)
        assert example.input_ids == tok(text, add_special_tokens=False)["input_ids"]
        assert text.startswith("<|im_start|>user\n")


def test_text_format_trains_on_every_token_plus_eos(tmp_path, tok):
    texts = [content for chat in TINY_CHATS for _, content in chat][:6]
    prepared = prepare(spec_for(tmp_path, write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])), tok)
    assert prepared.train_stats.formats == {"text": 6}
    for example, text in zip(prepared.train, texts):
        assert tok.decode(example.input_ids, skip_special_tokens=False) == text + END
        # Every token but the first (which nothing predicts) is a target.
        assert example.labels == [IGNORE, *example.input_ids[1:]]


# A variant whose generation prompt stops before the newline the template writes next.
ZEPHYR_BARE_PROMPT = ZEPHYR.replace("{{ '<|assistant|>' }}\n{% endif %}", "{{ '<|assistant|>' }}{% endif %}")


@pytest.mark.parametrize("template, lead", [(ZEPHYR, ""), (ZEPHYR_BARE_PROMPT, "\n")], ids=["tinyllama", "bare-prompt"])
def test_zephyr_templates_train_what_follows_the_generation_prompt(tmp_path, tok, template, lead):
    # Targets start where the generation prompt ends: what the model must write at inference,
    # including a newline the prompt leaves to it.
    spec = spec_for(tmp_path, write_jsonl(tmp_path / "d.jsonl", tiny_rows()), chat_template=template)
    prepared = prepare(spec, tok)
    for example, chat in zip(prepared.train, TINY_CHATS):
        assert target_runs(example, tok) == [lead + r + END for r in replies(chat)]
        assert tok.decode(example.input_ids, skip_special_tokens=False).startswith("<|user|>\n")


def test_default_system_prompt_template_and_assistant_first_chats(tmp_path, tok):
    rows = [*tiny_rows()[:3], {"messages": [{"role": "assistant", "content": "Namaste! Kya haal hai?"},
                                            {"role": "user", "content": "Sab badhiya."},
                                            {"role": "assistant", "content": "Bahut accha."}]}]
    prepared = prepare(spec_for(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), chat_template=SMOLLM2,
                                max_seq_len=512), tok)
    assert not prepared.train_stats.skipped
    expected = [*(replies(c) for c in TINY_CHATS[:3]), ["Namaste! Kya haal hai?", "Bahut accha."]]
    for example, reply_texts in zip(prepared.train, expected):
        assert target_runs(example, tok) == [r + END for r in reply_texts]
        assert "named SmolLM" in tok.decode(example.input_ids)


def test_train_on_prompt_labels_every_token(tmp_path, tok):
    spec = spec_for(tmp_path, write_jsonl(tmp_path / "d.jsonl", tiny_rows()), train_on_prompt=True)
    for example in prepare(spec, tok).train:
        assert example.labels == [IGNORE, *example.input_ids[1:]]


def test_truncation_keeps_the_start_and_counts(tmp_path, tok):
    rows = tiny_rows() + [{"messages": [{"role": "user", "content": "bahut lamba sawaal " * 20},
                                        {"role": "assistant", "content": "ok"}]}]
    prepared = prepare(spec_for(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), max_seq_len=40), tok)
    stats = prepared.train_stats
    assert max(stats.lengths) == 40 and stats.truncated > 0
    assert stats.skipped == {"no_target_after_truncation": 1}
    assert stats.first_skipped_rows == {"no_target_after_truncation": [len(rows)]}
    assert stats.target_tokens == sum(sum(t != IGNORE for t in e.labels) for e in prepared.train)
    assert stats.total_tokens == sum(stats.lengths)


# ---------------------------------------------------------------- bad rows and user errors

def test_each_bad_row_reason_is_counted_with_row_numbers(tmp_path, tok):
    good = json.dumps(tiny_rows()[0])

    def chat(*turns):
        return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})

    lines = [
        good,                                                        # 1
        "{not json",                                                 # 2 not_json
        "",                                                          # 3 blank: not a row
        "[1, 2]",                                                    # 4 not_json (not an object)
        chat(("user", "hi"), ("assistant", "  ")),                   # 5 empty_content
        chat(("tool", "42"), ("assistant", "ok")),                   # 6 unknown_role
        chat(("user", "hello?")),                                    # 7 no_assistant_turn
        chat(("user", "lamba " * 200), ("assistant", "ok")),         # 8 no_target_after_truncation
        json.dumps({"foo": 1}),                                      # 9 unknown_format
        chat(("system", "be nice"), ("user", "hi"), ("assistant", "hello")),  # 10 template_error
        json.dumps({"messages": "not a list"}),                      # 11 missing_fields
        good,                                                        # 12
        *["{broken"] * 6,                                            # 13-18 not_json
    ]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    refuses_system = CHATML.replace(
        "{% for message in messages %}",
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}")
    stats = prepare(spec_for(tmp_path, tmp_path / "bad.jsonl", chat_template=refuses_system), tok).train_stats
    assert stats.rows_read == 17 and stats.examples == 2
    assert stats.skipped == {"not_json": 8, "unknown_format": 1, "missing_fields": 1, "empty_content": 1,
                             "unknown_role": 1, "no_assistant_turn": 1, "template_error": 1,
                             "no_target_after_truncation": 1}
    assert stats.first_skipped_rows == {
        "not_json": [2, 4, 13, 14, 15], "unknown_format": [9], "missing_fields": [11], "empty_content": [5],
        "unknown_role": [6], "no_assistant_turn": [7], "template_error": [10], "no_target_after_truncation": [8]}


def test_no_usable_rows_is_a_user_error_naming_the_file(tmp_path, tok):
    path = write_jsonl(tmp_path / "empty_replies.jsonl", [{"prompt": "hi", "response": ""}] * 3)
    with pytest.raises(UserError, match=r"empty_replies\.jsonl: no usable rows.*empty_content.*3 \(rows 1, 2, 3\)"):
        prepare(spec_for(tmp_path, path), tok)


def test_missing_file_unsupported_type_and_unknown_format_are_user_errors(tmp_path, tok):
    with pytest.raises(UserError, match=r"data.train: file '.*nope.jsonl' not found"):
        prepare(spec_for(tmp_path, tmp_path / "nope.jsonl"), tok)
    with pytest.raises(UserError, match=r"data.train: no file matches"):
        prepare(spec_for(tmp_path, tmp_path / "*.parquet"), tok)
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match=r"data.train: '.*folder' is a folder; name a file, or a glob such as"):
        prepare(spec_for(tmp_path, tmp_path / "folder"), tok)
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(UserError, match=r"notes.txt: unsupported file type '.txt'; use one of .jsonl"):
        prepare(spec_for(tmp_path, tmp_path / "notes.txt"), tok)
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}] * 2)
    with pytest.raises(UserError, match=r"odd.jsonl: no row is in a known format; rows have the keys \['answer', "
                                        r"'question'\].*set data.format"):
        prepare(spec_for(tmp_path, path), tok)
    with pytest.raises(UserError, match=r"no usable rows.*missing_fields"):
        prepare(spec_for(tmp_path, write_jsonl(tmp_path / "m.jsonl", tiny_rows()), format="alpaca"), tok)


# ---------------------------------------------------------------- sources

def test_csv_parquet_and_glob_sources(tmp_path, tok):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = [(c[0][1], c[1][1]) for c in TINY_CHATS if len(c) == 2]
    pairs[0] = ("Ek line, aur\ndoosri line", pairs[0][1])  # quoting survives the CSV round trip
    pd.DataFrame(pairs, columns=["prompt", "response"]).to_csv(tmp_path / "pr.csv", index=False)
    csv = prepare(spec_for(tmp_path, tmp_path / "pr.csv"), tok)
    assert csv.train_stats.examples == len(pairs)
    assert "Ek line, aur\ndoosri line" in tok.decode(csv.train[0].input_ids)

    pq.write_table(pa.Table.from_pylist(tiny_rows()), tmp_path / "chats.parquet")
    parquet = prepare(spec_for(tmp_path, tmp_path / "chats.parquet"), tok)
    assert [target_runs(e, tok) for e in parquet.train] == [[r + END for r in replies(c)] for c in TINY_CHATS]

    write_jsonl(tmp_path / "part-1.jsonl", tiny_rows()[:3])
    (tmp_path / "part-2.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in tiny_rows()[3:5]) + "{oops\n", encoding="utf-8")
    globbed = prepare(spec_for(tmp_path, tmp_path / "part-*.jsonl"), tok).train_stats
    assert globbed.rows_read == 6 and globbed.examples == 5
    assert [Path(f).name for f, _ in globbed.files] == ["part-1.jsonl", "part-2.jsonl"]
    assert locate_row(globbed.first_skipped_rows["not_json"][0], globbed.files) == "part-2.jsonl:3"


def test_byte_order_mark_is_not_part_of_row_one(tmp_path, tok):
    """Files saved by Windows editors start with a UTF-8 BOM; every format reads row 1 as data."""
    import pandas as pd

    bom = b"\xef\xbb\xbf"
    rows = tiny_rows()[:3]
    (tmp_path / "bom.jsonl").write_bytes(bom + "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
    (tmp_path / "bom.json").write_bytes(bom + json.dumps(rows).encode("utf-8"))
    pairs = [(c[0][1], c[1][1]) for c in TINY_CHATS[:3]]
    (tmp_path / "bom.csv").write_bytes(bom + pd.DataFrame(pairs, columns=["prompt", "response"])
                                       .to_csv(index=False).encode("utf-8"))
    for name in ("bom.jsonl", "bom.json", "bom.csv"):
        stats = prepare(spec_for(tmp_path / f"cache-{name}", tmp_path / name), tok).train_stats
        assert (stats.examples, stats.skipped, stats.formats.keys() - {"messages", "prompt_response"}) == (3, {}, set()), name


def test_latin1_rows_are_reported_as_not_utf8(tmp_path, tok):
    good = json.dumps({"prompt": "Chai?", "response": "Haan, ek cup."}) + "\n"
    bad = json.dumps({"prompt": "Café?", "response": "Oui."}, ensure_ascii=False) + "\n"
    (tmp_path / "mixed.jsonl").write_bytes(good.encode("utf-8") + bad.encode("latin-1") + good.encode("utf-8"))
    stats = prepare(spec_for(tmp_path, tmp_path / "mixed.jsonl"), tok).train_stats
    assert stats.skipped == {"not_utf8": 1} and stats.first_skipped_rows == {"not_utf8": [2]}
    (tmp_path / "latin1.jsonl").write_bytes(bad.encode("latin-1") * 3)
    with pytest.raises(UserError, match=r"latin1.jsonl: no usable rows in data.train .*not_utf8 \(not UTF-8 text"):
        prepare(spec_for(tmp_path, tmp_path / "latin1.jsonl"), tok)
    (tmp_path / "latin1.csv").write_bytes("prompt,response\nCafé?,Oui.\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.csv: not UTF-8 text \(byte 0xe9 on line 2\); save it as UTF-8"):
        prepare(spec_for(tmp_path, tmp_path / "latin1.csv"), tok)


def test_an_empty_eval_file_is_a_user_error(tmp_path, tok):
    """Else the run trains, measures no perplexity at all, and exits 0."""
    train = write_jsonl(tmp_path / "train.jsonl", tiny_rows())
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=rf"{name}: data.eval is empty \(no rows\)"):
            prepare(spec_for(tmp_path, train, eval=str(tmp_path / name)), tok)


def test_a_train_set_too_small_to_hold_out_is_a_user_error(tmp_path, tok):
    one = write_jsonl(tmp_path / "one.jsonl", tiny_rows()[:1])
    with pytest.raises(UserError, match=r"one.jsonl: data.train has 1 row, too few to hold out "
                                        r"data.eval_fraction \(0.05\).*data.eval_fraction: 0"):
        prepare(spec_for(tmp_path, one, eval_fraction=0.05), tok)
    assert prepare(spec_for(tmp_path, one, eval_fraction=0.0), tok).train_stats.examples == 1


def test_hf_source_goes_through_datasets_load_dataset(tmp_path, tok, monkeypatch):
    # Only the hub download is mocked: datasets.load_dataset is replaced by a stand-in that
    # records its arguments and returns a real datasets.Dataset, as the hub call would.
    calls = []

    def fake_download(name, split=None, **kwargs):
        calls.append((name, split))
        return datasets.Dataset.from_list(tiny_rows())

    monkeypatch.setattr(datasets, "load_dataset", fake_download)
    prepared = prepare(spec_for(tmp_path, "hf://someorg/hinglish-chat:validation"), tok)
    assert calls == [("someorg/hinglish-chat", "validation")]
    assert prepared.train_stats.examples == len(TINY_CHATS)
    prepare(spec_for(tmp_path, "hf://someorg/hinglish-chat", eval="hf://someorg/other:test[:2]"), tok)
    assert calls[1:] == [("someorg/hinglish-chat", "train"), ("someorg/other", "test[:2]")]

    def offline(name, split=None, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"data.train: cannot load 'hf://someorg/x' .*no network.*local files"):
        prepare(spec_for(tmp_path, "hf://someorg/x"), tok)


def test_eval_fraction_split_is_deterministic_and_disjoint(tmp_path, tok):
    rows = [{"prompt": f"Sawaal number {i}?", "response": f"Jawaab {i}."} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    first = prepare(spec_for(tmp_path, path, eval_fraction=0.25), tok)
    again = prepare(spec_for(tmp_path / "other", path, eval_fraction=0.25), tok)  # fresh cache
    assert not again.cache_hit
    train_rows, eval_rows = [e.row for e in first.train], [e.row for e in first.eval]
    assert len(eval_rows) == 10 and not set(train_rows) & set(eval_rows)
    assert sorted(train_rows + eval_rows) == list(range(1, 41))
    assert ([e.row for e in again.train], [e.row for e in again.eval]) == (train_rows, eval_rows)
    other_seed = prepare(spec_for(tmp_path, path, eval_fraction=0.25, seed=7), tok)
    assert [e.row for e in other_seed.eval] != eval_rows


def test_max_examples_take_a_seeded_subset(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", tiny_rows() * 4)
    spec = spec_for(tmp_path, path, eval=str(path), max_train_examples=5, max_eval_examples=3)
    prepared = prepare(spec, tok)
    assert (len(prepared.train), len(prepared.eval)) == (5, 3)
    assert (prepared.train_stats.left_out, prepared.eval_stats.left_out) == (27, 29)
    assert [e.row for e in prepared.train] == sorted(e.row for e in prepared.train)


# ---------------------------------------------------------------- cache

def test_cache_hit_on_rerun_and_miss_after_a_template_change(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", tiny_rows() * 2)
    spec = spec_for(tmp_path, path, eval_fraction=0.2)
    first = prepare(spec, tok)
    assert not first.cache_hit
    folder = Path(first.cache_path)
    assert folder == tmp_path / "cache" / "data" / first.fingerprint
    assert {p.name for p in folder.iterdir()} == {"train.npz", "eval.npz", "stats.json", "inputs.json"}

    second = prepare(spec, tok)
    assert second.cache_hit and second.fingerprint == first.fingerprint
    assert (second.train, second.eval, second.train_stats, second.eval_stats) == \
        (first.train, first.eval, first.train_stats, first.eval_stats)
    assert second.pad_token_id == tok.pad_token_id

    # Packing happens per epoch on unpacked examples, so it does not split the cache.
    assert prepare(spec_for(tmp_path, path, eval_fraction=0.2, packing=False), tok).cache_hit
    for change in (dict(chat_template=ZEPHYR), dict(max_seq_len=64), dict(train_on_prompt=True),
                   dict(eval_fraction=0.3), dict(max_train_examples=4)):
        changed = prepare(spec_for(tmp_path, path, **{"eval_fraction": 0.2, **change}), tok)
        assert not changed.cache_hit and changed.fingerprint != first.fingerprint, change
    write_jsonl(path, tiny_rows() * 3)  # new content, same path
    assert not prepare(spec, tok).cache_hit
    assert not list((tmp_path / "cache" / "data").glob(".tmp-*"))


def test_cache_is_published_atomically(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", tiny_rows())
    spec = spec_for(tmp_path, path)
    real_write = data_cache._write_examples

    def crash_after_train(target, examples):
        real_write(target, examples)
        if target.name == "eval.npz":
            raise OSError("disk full")

    monkeypatch.setattr(data_cache, "_write_examples", crash_after_train)
    with pytest.raises(OSError):
        prepare(spec, tok)
    assert list((tmp_path / "cache" / "data").iterdir()) == []  # no half cache, no temp left

    monkeypatch.setattr(data_cache, "_write_examples", real_write)
    built = prepare(spec, tok)
    # A second trial that built the same data concurrently loses the rename and keeps the first copy.
    data_cache.store(Path(built.cache_path), built, {"concurrent": True})
    assert json.loads((Path(built.cache_path) / "inputs.json").read_text())["version"] == data_cache.CACHE_VERSION
    assert prepare(spec, tok).cache_hit
    assert [p.name for p in (tmp_path / "cache" / "data").iterdir()] == [built.fingerprint]

    # A damaged cache is never trusted: it is rebuilt in place.
    (Path(built.cache_path) / "train.npz").write_bytes(b"garbage")
    rebuilt = prepare(spec, tok)
    assert not rebuilt.cache_hit and rebuilt.train == built.train
    assert prepare(spec, tok).cache_hit


# ---------------------------------------------------------------- batches and packing

@pytest.fixture
def packed(tmp_path, tok) -> tuple[PreparedData, DataSpec]:
    spec = spec_for(tmp_path, write_jsonl(tmp_path / "d.jsonl", tiny_rows() * 3), max_seq_len=160)
    return prepare(spec, tok), spec


def _segments(batch, pad_id):
    """(input_ids, labels) of each example in a packed batch, found by position restarts."""
    out = []
    for ids, labels, pos in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
        starts = [i for i, p in enumerate(pos.tolist()) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            if (ids[a:b] == pad_id).all():
                assert (labels[a:b] == IGNORE).all()  # tail padding is never a target
                continue
            out.append((tuple(ids[a:b].tolist()), tuple(labels[a:b].tolist())))
    return out


def test_packing_keeps_every_target_token_exactly_once(packed, tok):
    prepared, spec = packed
    batches = train_batches(prepared, spec, batch_size=3, epoch=0, seed=42)
    seen = [seg for batch in batches for seg in _segments(batch, tok.pad_token_id)]
    assert sorted(seen) == sorted((tuple(e.input_ids), tuple(e.labels)) for e in prepared.train)
    assert sum(int((b["labels"] != IGNORE).sum()) for b in batches) == prepared.train_stats.target_tokens
    rows = sum(len(b["input_ids"]) for b in batches)
    assert rows < len(prepared.train)  # several examples share a row
    for batch in batches:
        n, width = batch["input_ids"].shape
        assert width <= spec.max_seq_len and batch["attention_mask"].shape == (n, 1, width, width)
        assert batch["attention_mask"].dtype == torch.bool
        # Block-diagonal causal: a token sees itself and earlier tokens of its own example only.
        segment = (batch["position_ids"] == 0).cumsum(-1)
        expected = (segment[:, :, None] == segment[:, None, :]) & torch.ones(width, width, dtype=torch.bool).tril()
        assert torch.equal(batch["attention_mask"][:, 0], expected)


def test_train_batches_are_deterministic_per_epoch_and_resumable(packed):
    prepared, spec = packed
    one = train_batches(prepared, spec, 2, epoch=1, seed=3)
    two = train_batches(prepared, spec, 2, epoch=1, seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(one, two))
    other_epoch = train_batches(prepared, spec, 2, epoch=2, seed=3)
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(one, other_epoch))
    skipped = one[2:]
    assert len(skipped) == len(one) - 2 and torch.equal(skipped[0]["input_ids"], one[2]["input_ids"])


def test_unpacked_train_and_eval_batches_are_right_padded(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", tiny_rows() * 2)
    spec = spec_for(tmp_path, path, eval=str(path), packing=False)
    prepared = prepare(spec, tok)
    batches = train_batches(prepared, spec, batch_size=4, epoch=0, seed=0)
    assert len(batches) == 4
    assert sorted(tuple(ids[m.bool()].tolist()) for b in batches for ids, m in zip(b["input_ids"], b["attention_mask"])) \
        == sorted(tuple(e.input_ids) for e in prepared.train)
    evals = list(eval_batches(prepared, batch_size=3))
    assert [len(b["input_ids"]) for b in evals] == [3, 3, 3, 3, 3, 1]
    first = evals[0]
    lengths = sorted((len(e.input_ids) for e in prepared.eval), reverse=True)[:3]
    assert first["attention_mask"].sum(-1).tolist() == lengths  # longest first: little padding
    assert sum(int(b["attention_mask"].sum()) for b in evals) == sum(len(e.input_ids) for e in prepared.eval)
    for row, n in enumerate(lengths):
        assert (first["input_ids"][row, n:] == tok.pad_token_id).all()
        assert (first["labels"][row, n:] == IGNORE).all()
    assert torch.equal(first["position_ids"][0], torch.arange(first["input_ids"].shape[1]))


def _token_losses(model, batch, **kwargs) -> torch.Tensor:
    """The loss of every target token of the batch, in order."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, **kwargs).logits
    labels = batch["labels"][:, 1:].flatten()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels, ignore_index=IGNORE,
                                               reduction="none")
    return losses[labels != IGNORE]


def test_packed_row_loss_equals_the_sum_of_separate_losses(packed, tok, tiny_model_dir):
    prepared, spec = packed
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    batch = train_batches(prepared, spec, batch_size=2, epoch=0, seed=42)[0]
    examples = [e for b in range(2) for e in _examples_in_row(prepared, batch, b, tok.pad_token_id)]
    assert len(examples) >= 4
    with torch.no_grad():
        packed_losses = _token_losses(model, batch)
        separate = torch.cat([_token_losses(model, collate_padded([e], tok.pad_token_id)) for e in examples])
        # transformers' own route: no mask, positions restart -> the same block-diagonal attention,
        # but only without a KV cache (with one, which use_cache=True makes even in train mode,
        # it silently falls back to plain causal attention across examples).
        by_positions = _token_losses(model, {k: v for k, v in batch.items() if k != "attention_mask"},
                                     use_cache=False)
        plain_causal = _token_losses(model, {"input_ids": batch["input_ids"], "labels": batch["labels"]})
    # Token by token within 1e-4; the sums (about 850 here) then agree to fp32 rounding.
    assert packed_losses.shape == separate.shape
    assert (packed_losses - separate).abs().max() < 1e-4
    assert torch.isclose(packed_losses.sum(), separate.sum(), rtol=1e-6)
    assert (by_positions - separate).abs().max() < 1e-4
    assert (plain_causal - separate).abs().max() > 1e-2  # the mask is what makes them equal


def _examples_in_row(prepared, batch, row, pad_id):
    by_tokens = {(tuple(e.input_ids), tuple(e.labels)): e for e in prepared.train}
    one_row = {k: v[row:row + 1] for k, v in batch.items()}
    return [by_tokens[seg] for seg in _segments(one_row, pad_id)]


def test_render_example_marks_the_trained_tokens(tmp_path, tok):
    prepared = prepare(spec_for(tmp_path, write_jsonl(tmp_path / "d.jsonl", tiny_rows())), tok)
    text = render_example(prepared.train[2], tok)
    assert text == ("<|im_start|>user\nUPI payment fail ho gaya<|im_end|>\n<|im_start|>assistant\n"
                    "[[Paise 2-3 din mein wapas aa jaate hain, bank app check karo.<|im_end|>]]\n"
                    "<|im_start|>user\nAur na aaye toh?<|im_end|>\n<|im_start|>assistant\n"
                    "[[Toh bank ke customer care pe complaint daalo.<|im_end|>]]\n")


# ---------------------------------------------------------------- CLI

def test_cli_data_reports_counts_lengths_cache_and_an_example(tiny_spec_file, tiny_data_dir):
    runner = CliRunner()
    first = runner.invoke(app, ["data", str(tiny_spec_file), "data.max_seq_len=160"])
    assert first.exit_code == 0, first.output
    for expected in ("rows read", "train token lengths: min", "eval token lengths", "packing: 32 examples",
                     "cache: miss", "[[Paani ubaalo, chai patti aur cheeni daalo, phir doodh.<|im_end|>]]"):
        assert expected in first.output, expected
    second = runner.invoke(app, ["data", str(tiny_spec_file), "data.max_seq_len=160", "--example", "2"])
    assert second.exit_code == 0 and "cache: hit" in second.output
    assert "[[Toh bank ke customer care pe complaint daalo.<|im_end|>]]" in second.output


def test_cli_data_shows_skipped_rows_and_exits_2_on_unusable_data(tiny_spec_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in tiny_rows()) + "{oops\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["data", str(tiny_spec_file), f"data.train={bad}"])
    assert result.exit_code == 0, result.output
    assert "not_json" in result.output and "1 (row 9)" in result.output
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"q": "a"}])
    result = CliRunner().invoke(app, ["data", str(tiny_spec_file), f"data.train={odd}"])
    assert result.exit_code == 2 and "odd.jsonl: no row is in a known format" in result.output


# ---------------------------------------------------------------- the offline SmolLM2 tokenizer

@pytest.fixture(scope="module")
def smollm2_tok(smollm2_gguf):
    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca", "prompt_response"])
def test_smollm2_labels_cover_exactly_the_replies(tmp_path, smollm2_tok, fmt):
    rows, expected = _rows(fmt)
    prepared = prepare(spec_for(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows)), smollm2_tok)
    assert not prepared.train_stats.skipped
    for example, reply_texts in zip(prepared.train, expected):
        assert target_runs(example, smollm2_tok) == [r + END for r in reply_texts]
        text = smollm2_tok.decode(example.input_ids, skip_special_tokens=False)
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.slow
def test_smollm2_text_and_packed_batches(tmp_path, smollm2_tok):
    texts = ["Aaj mausam bahut accha hai, chalo bahar chalte hain.", "Mera phone charge nahi ho raha."]
    rows = [{"text": t} for t in texts] + tiny_rows()
    spec = spec_for(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), max_seq_len=256)
    prepared = prepare(spec, smollm2_tok)
    assert prepared.train_stats.formats == {"text": 2, "messages": len(TINY_CHATS)}
    for example, text in zip(prepared.train, texts):
        assert smollm2_tok.decode(example.input_ids, skip_special_tokens=False) == text + END
    batches = train_batches(prepared, spec, 4, 0, 0)
    assert sum(int((b["labels"] != IGNORE).sum()) for b in batches) == prepared.train_stats.target_tokens


@pytest.mark.slow
def test_hinglish_job_data_prepares_cleanly(tmp_path, smollm2_tok):
    root = Path(__file__).resolve().parents[1] / "data" / "hinglish"
    if not (root / "train.jsonl").stat().st_size:
        pytest.skip("data/hinglish/train.jsonl is still empty")
    spec = spec_for(tmp_path, root / "train.jsonl", eval=str(root / "eval.jsonl"), max_seq_len=256)
    prepared = prepare(spec, smollm2_tok)
    for stats in (prepared.train_stats, prepared.eval_stats):
        assert stats.examples > 0 and "template_mismatch" not in stats.skipped
    for example in prepared.train[:50]:
        assert target_runs(example, smollm2_tok)[-1].endswith(END) or len(example.input_ids) == 256
