"""Row formats: turn one raw row into a chat (list of role/content messages) or a plain text.

Formats, named by ``data.format`` or detected per row when it is ``auto`` (so a file may mix
them, as real corpora do):

- ``messages``: ``{"messages": [{"role", "content"}, ...]}``; also ShareGPT
  ``{"conversations": [{"from", "value"}, ...]}`` with human -> user, gpt -> assistant.
- ``alpaca``: ``{"instruction", "input" (optional), "output"}`` -> one user turn, one reply.
- ``prompt_response``: ``{"prompt", "response"}`` -> one user turn, one reply.
- ``text``: ``{"text"}``; trained on every token, no chat template.

A row that cannot be used raises :class:`BadRow` with a short reason; the caller counts it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

# ShareGPT and other dumps name the speakers differently; everything maps onto the three
# roles every chat template understands.
ROLE_NAMES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant",
}

# Why a row was skipped, in the order the CLI lists them.
SKIP_REASONS = {
    "not_utf8": "not UTF-8 text (save the file as UTF-8)",
    "not_json": "not a JSON object",
    "unknown_format": "no known format's fields (messages, conversations, instruction/output, prompt/response, text)",
    "missing_fields": "lacks the fields data.format names",
    "empty_content": "a message, prompt, reply or text is empty",
    "unknown_role": "a role other than system/user/assistant (human/gpt)",
    "no_assistant_turn": "no assistant reply to train on",
    "template_error": "the chat template refused the conversation",
    "template_mismatch": "the assistant reply could not be located in the rendered template",
    "no_target_after_truncation": "nothing left to train after truncation to max_seq_len",
}


class BadRow(Exception):
    """A row that cannot be used; ``reason`` is a key of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str):
        assert reason in SKIP_REASONS, reason
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Chat:
    """A conversation ending with an assistant turn; ``messages`` are ``{"role", "content"}`` dicts."""

    messages: List[Dict[str, str]]


@dataclass(frozen=True)
class Text:
    """A plain document, trained on all of its tokens."""

    text: str


Record = Union[Chat, Text]


def detect_format(row: Dict[str, Any]) -> Optional[str]:
    """The format a row's keys say it is in, or None."""
    if "messages" in row or "conversations" in row:
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "response" in row:
        return "prompt_response"
    if "text" in row:
        return "text"
    return None


def normalize(row: Any, fmt: str) -> Record:
    """Turn a raw row into a :class:`Chat` or :class:`Text`; raise :class:`BadRow` if unusable.

    ``fmt`` is ``auto`` (detect from the row's keys) or one of the named formats.
    """
    if not isinstance(row, dict):
        raise BadRow("not_json")
    detected = detect_format(row)
    if fmt == "auto":
        if detected is None:
            raise BadRow("unknown_format")
        fmt = detected
    if fmt == "messages":
        return _chat(row)
    if fmt == "alpaca":
        instruction, extra = _field(row, "instruction"), row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise BadRow("missing_fields")
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return _single_turn(prompt, _field(row, "output"))
    if fmt == "prompt_response":
        return _single_turn(_field(row, "prompt"), _field(row, "response"))
    if fmt == "text":
        text = _field(row, "text")
        if not text.strip():
            raise BadRow("empty_content")
        return Text(text)
    raise ValueError(f"unknown format {fmt!r}")  # spec validation rules this out


def _field(row: Dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None and key in row:
        raise BadRow("empty_content")
    if not isinstance(value, str):
        raise BadRow("missing_fields")
    return value


def _single_turn(prompt: str, reply: str) -> Chat:
    if not prompt.strip() or not reply.strip():
        raise BadRow("empty_content")
    return Chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}])


def _chat(row: Dict[str, Any]) -> Chat:
    sharegpt = "messages" not in row
    turns = row.get("conversations") if sharegpt else row.get("messages")
    if isinstance(turns, str):  # CSV cells can only hold the list as JSON text
        try:
            turns = json.loads(turns)
        except ValueError:
            raise BadRow("missing_fields") from None
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise BadRow("missing_fields")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    messages = []
    for turn in turns:
        role = ROLE_NAMES.get(str(turn.get(role_key, "")).strip().lower())
        if role is None:
            raise BadRow("unknown_role")
        content = turn.get(content_key)
        if not isinstance(content, str) or not content.strip():
            raise BadRow("empty_content")
        messages.append({"role": role, "content": content})
    last_reply = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last_reply is None:
        raise BadRow("no_assistant_turn")
    # Turns after the last reply teach nothing and only cost tokens.
    return Chat(messages[: last_reply + 1])


def format_name(row: Dict[str, Any], fmt: str) -> str:
    """The format a usable row was read as, for the stats (ShareGPT shown apart from messages)."""
    name = detect_format(row) if fmt == "auto" else fmt
    if name == "messages" and "messages" not in row:
        return "sharegpt"
    return name or "unknown"
