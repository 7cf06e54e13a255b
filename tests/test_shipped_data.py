"""The shipped chat data passes data/check_data.py, and the checker names the file and row of
each kind of problem it looks for."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"


def _load_checker():
    # data/ is a folder of files, not a package: load the script by path.
    spec = importlib.util.spec_from_file_location("check_data", DATA / "check_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


check = _load_checker()


def chat(*turns: str, system: str | None = None) -> dict:
    """A messages row from alternating user/assistant contents."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    return {"messages": messages}


def write_rows(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def shipped():
    return check.run_checks(DATA)


def test_shipped_files_pass_every_check(shipped):
    counts, problems = shipped
    assert [str(p) for p in problems] == []
    assert counts[check.CONTROL] >= 150
    assert counts[check.TEST] == 120
    assert counts[check.TRAIN] > 0 and counts[check.EVAL] > 0


def test_shipped_control_and_test_sets_have_multi_turn_and_system_rows():
    for name in (check.CONTROL, check.TEST):
        chats, _ = check.load_chats(DATA, name)
        multi = sum(sum(m["role"] == "user" for m in c.messages) > 1 for c in chats)
        assert len(chats) / 4 <= multi <= len(chats) / 2, name  # about a third are multi-turn
        assert any(c.messages[0]["role"] == "system" for c in chats), name


def _tiny_root(root: Path) -> None:
    """A data folder with one problem of each kind, and clean rows around them."""
    opener = "Ghar pe paneer aur shimla mirch hai, dinner me kya banau jaldi se?"
    write_rows(root / check.TRAIN, [
        chat(opener, "Paneer bhurji ya kadhai paneer, dono 20 minute me ban jaate hain."),
        '{"messages": [',
        chat("Chai kaise banate hain?", "Paani, patti, doodh aur cheeni ubaalo.", "Aur?"),
        chat("Kuch batao", "   "),
        {"messages": [{"role": "assistant", "content": "Namaste"}]},
        chat("Mausam kaisa hai aaj Delhi me garmi bahut hai", "Haan, paani peete raho."),
    ])
    write_rows(root / check.EVAL, [
        chat(opener.replace("jaldi se", "jaldi"), "Kuch bhi alag jawab yahan."),
        chat("Laptop slow hai kya karun", "Restart karo aur startup apps band karo."),
    ])
    write_rows(root / check.TEST, [
        chat("Laptop slow hai kya karun", "Task manager dekho.", system="Hinglish me jawab do."),
    ])
    write_rows(root / check.CONTROL, [chat("How do I boil an egg?", "Simmer it for nine minutes.")])
    (root / check.PROMPTS).write_text("Mausam kaisa hai aaj Delhi me garmi bahut hai\nKoi naya sawaal\n", encoding="utf-8")


def test_checker_names_file_and_row_of_each_problem(tmp_path, capsys):
    _tiny_root(tmp_path)
    real = tmp_path / "real.jsonl"
    write_rows(real, [{"text": "kuch aur. Restart karo aur startup apps band karo."}])

    assert check.main(["--root", str(tmp_path), "--real", str(real)]) == 2
    err = capsys.readouterr().err.splitlines()
    expected = [
        "hinglish/train.jsonl:2: not valid JSON",
        "hinglish/train.jsonl:3: roles are ['user', 'assistant', 'user']",
        "hinglish/train.jsonl:4: message 2 (assistant) has empty content",
        "hinglish/train.jsonl:5: roles are ['assistant']",
        "hinglish/test.jsonl:1: first user message repeats hinglish/eval.jsonl row 2",
        "hinglish/eval.jsonl:1: first user message is a near copy (difflib ratio >= 0.85) of "
        "hinglish/train.jsonl row 1",
        "hinglish/prompts.txt:1: prompt opens hinglish/train.jsonl row 6",
        "hinglish/eval.jsonl:2: message 2 equals a sentence of the real-text set",
    ]
    for line in expected:
        assert any(e.startswith(line) for e in err), (line, err)
    assert not any("hinglish/train.jsonl:6" in e or "control/" in e for e in err)


def test_near_copy_of_a_whole_conversation_is_caught_word_by_word(tmp_path):
    reply = ("Pehle router restart karo, phir dekho ki light hari hai ya nahi. Agar laal hai toh "
             "internet wale ko call karo aur complaint number le lo, do din me theek ho jaata hai.")
    train = check.Chat(check.TRAIN, 7, tuple(chat("Wifi nahi chal raha ghar pe", reply)["messages"]))
    copy = check.Chat(check.TEST, 3, tuple(chat("Ghar ka internet band hai subah se", reply)["messages"]))
    other = check.Chat(check.TEST, 4, tuple(chat("Ghar ka internet band hai subah se", "Router dekho.")["messages"]))
    problems = check.near_copies([copy, other], [train])
    assert [str(p) for p in problems] == [
        "hinglish/test.jsonl:3: conversation is a near copy (difflib ratio >= 0.85) of hinglish/train.jsonl row 7"]


def test_clean_root_passes_and_a_missing_real_file_is_a_clear_error(tmp_path, capsys):
    write_rows(tmp_path / check.TRAIN, [chat("Dal kaise banti hai?", "Dal dho ke cooker me teen seeti.")])
    write_rows(tmp_path / check.EVAL, [chat("Chawal kitni der bhigoyein?", "Aadha ghanta kaafi hai.")])
    write_rows(tmp_path / check.TEST, [chat("Roti phoolti kyun nahi?", "Aata naram goondho.")])
    write_rows(tmp_path / check.CONTROL, [chat("What is rain?", "Water falling from clouds.")])
    (tmp_path / check.PROMPTS).write_text("Paratha kaise banaun?\n", encoding="utf-8")
    assert check.main(["--root", str(tmp_path)]) == 0
    assert "all checks passed" in capsys.readouterr().out

    assert check.main(["--root", str(tmp_path), "--real", str(tmp_path / "nope.jsonl")]) == 2
    assert "--real: file '" in capsys.readouterr().err
