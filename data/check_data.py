"""Check the shipped chat data files before they are committed.

    python data/check_data.py [--real FILE]

Checks, over every shipped file: each line parses as a `messages` row; roles are an optional
leading system message, then user and assistant turns alternating, ending with the assistant;
no content is empty; no first user message repeats within or across files; no eval or test
conversation is a near copy of a training one (nor a test one of an eval one); no prompt in
`hinglish/prompts.txt` opens a conversation. With `--real FILE` (JSONL rows with a `text` or
`messages` key), also that no shipped message equals a sentence of that file.

Prints one line per problem, naming the file and row, and exits 2; exits 0 when all pass.
Standard library only, so it runs without the project installed.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
TRAIN = "hinglish/train.jsonl"
EVAL = "hinglish/eval.jsonl"
TEST = "hinglish/test.jsonl"
CONTROL = "control/chat_en.jsonl"
PROMPTS = "hinglish/prompts.txt"
CHAT_FILES = (TRAIN, EVAL, TEST, CONTROL)
# A held-out file is compared with the files listed for it: neither selection (eval) nor the
# final report (test) may score text the model was trained on or selected with.
HELD_OUT = {EVAL: (TRAIN,), TEST: (TRAIN, EVAL)}
NEAR_COPY = 0.85
# Sentences this short ("Thank you.") are everyday phrases, not copied text.
MIN_SENTENCE_WORDS = 4


@dataclass(frozen=True)
class Problem:
    """One failed check: the file, its 1-based row (0 for the file itself) and what is wrong."""

    path: str
    row: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.row}: {self.message}" if self.row else f"{self.path}: {self.message}"


@dataclass(frozen=True)
class Chat:
    """One parsed conversation: where it came from and its messages."""

    path: str
    row: int
    messages: tuple[dict, ...]

    @property
    def opener(self) -> str:
        """The first user message."""
        return next(m["content"] for m in self.messages if m["role"] == "user")

    @property
    def text(self) -> str:
        """All message contents, one per line."""
        return "\n".join(m["content"] for m in self.messages)


def normalise(text: str) -> str:
    """Case-folded with runs of whitespace made one space, for equality checks."""
    return " ".join(text.casefold().split())


def row_problem(messages: object) -> str | None:
    """What is wrong with one row's `messages` value, or None when it is well formed."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i} must be an object with string 'role' and 'content'"
        if not m["content"].strip():
            return f"message {i} ({m['role']}) has empty content"
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if not turns or turns != expected[: len(turns)] or turns[-1] != "assistant":
        return (f"roles are {roles}; use an optional leading 'system', then 'user' and "
                "'assistant' alternating, ending with 'assistant'")
    return None


def load_chats(root: Path, name: str) -> tuple[list[Chat], list[Problem]]:
    """Parse one JSONL chat file; rows with problems are reported and left out of the chats."""
    path = root / name
    if not path.is_file():
        return [], [Problem(name, 0, "file not found")]
    chats, problems = [], []
    for row, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(Problem(name, row, f"not valid JSON ({err.msg} at column {err.colno})"))
            continue
        if not isinstance(record, dict) or set(record) != {"messages"}:
            problems.append(Problem(name, row, "a row must be an object with the one key 'messages'"))
            continue
        issue = row_problem(record["messages"])
        if issue:
            problems.append(Problem(name, row, issue))
        else:
            chats.append(Chat(name, row, tuple(record["messages"])))
    return chats, problems


def repeated_openers(chats: list[Chat]) -> list[Problem]:
    """Every conversation whose first user message already opened an earlier one, in any file."""
    first_seen: dict[str, Chat] = {}
    problems = []
    for chat in chats:
        key = normalise(chat.opener)
        earlier = first_seen.setdefault(key, chat)
        if earlier is not chat:
            problems.append(Problem(chat.path, chat.row,
                                    f"first user message repeats {earlier.path} row {earlier.row}"))
    return problems


def _similar(a: str | list[str], candidates: list, threshold: float) -> int | None:
    """Index of the first candidate whose difflib ratio with `a` reaches the threshold."""
    matcher = difflib.SequenceMatcher(None, autojunk=False)
    matcher.set_seq2(a)  # the matcher caches its analysis of seq2, so the fixed side goes there
    for i, b in enumerate(candidates):
        matcher.set_seq1(b)
        # Both quick ratios are upper bounds of ratio(), so most pairs never need the full one.
        if (matcher.real_quick_ratio() >= threshold and matcher.quick_ratio() >= threshold
                and matcher.ratio() >= threshold):
            return i
    return None


def near_copies(held_out: list[Chat], reference: list[Chat], threshold: float = NEAR_COPY) -> list[Problem]:
    """Held-out conversations too close to a reference one: first user messages compared
    character by character, whole conversations word by word (characters would cost minutes)."""
    openers = [normalise(c.opener) for c in reference]
    texts = [normalise(c.text).split() for c in reference]
    problems = []
    for chat in held_out:
        for what, mine, theirs in (("first user message", normalise(chat.opener), openers),
                                   ("conversation", normalise(chat.text).split(), texts)):
            hit = _similar(mine, theirs, threshold)
            if hit is not None:
                near = reference[hit]
                problems.append(Problem(chat.path, chat.row, f"{what} is a near copy (difflib ratio >= "
                                        f"{threshold}) of {near.path} row {near.row}"))
                break
    return problems


def prompts_opening_chats(root: Path, chats: list[Chat], name: str = PROMPTS) -> list[Problem]:
    """Prompts (one per line) that equal the first user message of a shipped conversation."""
    path = root / name
    if not path.is_file():
        return [Problem(name, 0, "file not found")]
    openers = {normalise(c.opener): c for c in chats}
    problems = []
    for row, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            problems.append(Problem(name, row, "empty prompt line"))
        elif normalise(line) in openers:
            chat = openers[normalise(line)]
            problems.append(Problem(name, row, f"prompt opens {chat.path} row {chat.row}"))
    return problems


def sentences(text: str) -> list[str]:
    """The text split after sentence-ending punctuation and at line breaks, normalised."""
    return [normalise(s) for s in re.split(r"(?<=[.!?\u0964])\s+|\n+", text) if s.strip()]


def load_real_sentences(path: Path) -> set[str]:
    """Every sentence (and whole text) of a JSONL file of `text` or `messages` rows."""
    found: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        texts = [record["text"]] if "text" in record else [m["content"] for m in record.get("messages", [])]
        for text in texts:
            found.add(normalise(text))
            found.update(sentences(text))
    return found


def copied_from_real(chats: list[Chat], real: set[str], prompts: list[tuple[int, str]]) -> list[Problem]:
    """Messages (and prompts) that equal a real-set sentence, or contain one of a few words or more."""
    def hit(text: str) -> bool:
        if normalise(text) in real:
            return True
        return any(s in real for s in sentences(text) if len(s.split()) >= MIN_SENTENCE_WORDS)

    problems = [Problem(c.path, c.row, f"message {i} equals a sentence of the real-text set")
                for c in chats for i, m in enumerate(c.messages, 1) if hit(m["content"])]
    problems += [Problem(PROMPTS, row, "prompt equals a sentence of the real-text set")
                 for row, text in prompts if hit(text)]
    return problems


def run_checks(root: Path = DATA_DIR, real: Path | None = None) -> tuple[dict[str, int], list[Problem]]:
    """Every check over the shipped files under `root`: rows per file and the problems found."""
    by_file: dict[str, list[Chat]] = {}
    problems: list[Problem] = []
    for name in CHAT_FILES:
        by_file[name], found = load_chats(root, name)
        problems += found
    every = [c for name in CHAT_FILES for c in by_file[name]]
    problems += repeated_openers(every)
    for name, references in HELD_OUT.items():
        problems += near_copies(by_file[name], [c for ref in references for c in by_file[ref]])
    problems += prompts_opening_chats(root, every)
    if real is not None:
        prompt_path = root / PROMPTS
        prompts = list(enumerate(prompt_path.read_text(encoding="utf-8").splitlines(), 1)) if prompt_path.is_file() else []
        problems += copied_from_real(every, load_real_sentences(real), prompts)
    return {name: len(chats) for name, chats in by_file.items()}, problems


def main(argv: list[str] | None = None) -> int:
    """Run the checks, print the row counts or the problems; 0 when clean, 2 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path, help="JSONL file of real text no shipped message may copy")
    parser.add_argument("--root", type=Path, default=DATA_DIR, help="data folder to check (default: this one)")
    args = parser.parse_args(argv)
    if args.real is not None and not args.real.is_file():
        print(f"--real: file '{args.real}' not found; pass an existing JSONL file or leave the option out",
              file=sys.stderr)
        return 2
    counts, problems = run_checks(args.root, args.real)
    for problem in problems:
        print(problem, file=sys.stderr)
    for name, rows in counts.items():
        print(f"{name}: {rows} conversations")
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 2
    real_note = f", no message copied from {args.real}" if args.real else ""
    print(f"all checks passed{real_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
