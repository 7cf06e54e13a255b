"""An Ollama ``Modelfile`` for an exported GGUF: chat template, default system prompt, stop tokens.

Ollama templates are Go templates, not the tokenizer's Jinja. Rather than translate Jinja,
the tokenizer's own template is rendered on marker messages to read off, per role, the text
before and after a message's content; the pieces are accepted only when they rebuild the
template's rendering of a multi-turn conversation exactly. Templates that are not one block
per message (Llama-2's ``[INST]`` folding the system prompt into the first turn, say) fail
that test, and the Modelfile then leaves the template to the chat template stored in the
GGUF, which Ollama reads itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

_MARK = {"system": "\x02S\x03", "user": "\x02U\x03", "assistant": "\x02A\x03"}


@dataclass(frozen=True)
class ChatPieces:
    """Text around each role's content, the generation prompt, and the template's default system prompt."""

    before: dict
    after: dict
    generation: str
    default_system: Optional[str]

    def render(self, messages: List[dict]) -> str:
        body = "".join(self.before[m["role"]] + m["content"] + self.after[m["role"]] for m in messages)
        return body + self.generation


def chat_pieces(tokenizer, template: Optional[str] = None) -> Optional[ChatPieces]:
    """The per-role pieces of ``template`` (default: the tokenizer's), or None when it is not one block per message."""
    def render(messages, generation=False):
        return tokenizer.apply_chat_template([{"role": r, "content": _MARK[r]} for r in messages], chat_template=template,
                                             tokenize=False, add_generation_prompt=generation)

    try:
        system, system_user = render(["system"]), render(["system", "user"])
        user, user_assistant = render(["user"]), render(["user", "assistant"])
        with_prompt = render(["system", "user"], generation=True)
    except Exception:  # a template that rejects a role or an order: no pieces
        return None
    before, after = {}, {}
    for role, whole, prefix in (("system", system, ""), ("user", system_user, system),
                                ("assistant", user_assistant, user)):
        if not whole.startswith(prefix) or whole[len(prefix):].count(_MARK[role]) != 1:
            return None
        before[role], after[role] = whole[len(prefix):].split(_MARK[role])
    if not with_prompt.startswith(system_user):
        return None
    pieces = ChatPieces(before, after, with_prompt[len(system_user):], _default_system(user, before, after))
    return pieces if _rebuilds(tokenizer, template, pieces) else None


def _default_system(user_only: str, before: dict, after: dict) -> Optional[str]:
    """The system prompt a template inserts when the conversation has none (SmolLM2 does)."""
    user_block = before["user"] + _MARK["user"] + after["user"]
    head = user_only[: len(user_only) - len(user_block)] if user_only.endswith(user_block) else None
    if not head:
        return None
    if head.startswith(before["system"]) and head.endswith(after["system"]):
        return head[len(before["system"]): len(head) - len(after["system"])]
    return None


def _rebuilds(tokenizer, template, pieces: ChatPieces) -> bool:
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Chai kaise banate hain?"},
             {"role": "assistant", "content": "Paani ubaalo."}, {"role": "user", "content": "Aur doodh?"}]
    for messages in (turns, turns[1:]):
        expected = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        if messages[0]["role"] != "system" and pieces.default_system is not None:
            messages = [{"role": "system", "content": pieces.default_system}] + messages
        if pieces.render(messages) != expected:
            return False
    return True


def stop_tokens(tokenizer, pieces: Optional[ChatPieces], generation_eos=None) -> List[str]:
    """EOS, the model's configured end ids, and special tokens that end a reply or open a user turn."""
    specials = set(tokenizer.all_special_tokens) | {
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    found = [tokenizer.eos_token] if tokenizer.eos_token else []
    ids = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    found += [tokenizer.convert_ids_to_tokens(i) for i in ids if isinstance(i, int)]
    if pieces is not None:
        found += sorted((t for t in specials if t and (t in pieces.after["assistant"] or t in pieces.before["user"])),
                        key=lambda t: (pieces.after["assistant"] + pieces.before["user"]).find(t))
    return [t for i, t in enumerate(found) if t and t not in found[:i]]


def _go_literal(text: str) -> Optional[str]:
    """``text`` as Go-template literal text inside a triple-quoted Modelfile value, or None if it cannot be."""
    return None if "{{" in text or '"""' in text else text


def go_template(pieces: ChatPieces) -> Optional[str]:
    """The Ollama (Go) template for ``pieces``: one block per message, then the generation prompt."""
    parts = {key: _go_literal(value) for key, value in
             [(f"{r}.before", pieces.before[r]) for r in _MARK] + [(f"{r}.after", pieces.after[r]) for r in _MARK]
             + [("generation", pieces.generation)]}
    if any(v is None for v in parts.values()):
        return None
    # No `{{-` trimming: it would also eat newlines that belong to the template's own text.
    body = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{r}" }}}}{parts[r + ".before"]}'
                   f'{{{{ .Content }}}}{parts[r + ".after"]}' for i, r in enumerate(_MARK))
    return f"{{{{ range .Messages }}}}{body}{{{{ end }}}}{{{{ end }}}}{parts['generation']}"


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile(source: str, tokenizer, template: Optional[str] = None, adapter: Optional[str] = None,
              generation_eos=None) -> str:
    """The Modelfile text: ``FROM source`` (and ``ADAPTER adapter``), template, system prompt, stops."""
    pieces = chat_pieces(tokenizer, template)
    go = go_template(pieces) if pieces is not None else None
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM {source}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if go is not None:
        lines.append(f'TEMPLATE """{go}"""')
        if pieces.default_system and _go_literal(pieces.default_system):
            lines.append(f'SYSTEM """{pieces.default_system}"""')
    else:
        lines.append("# The chat template is not one block per message; Ollama reads the one stored in the GGUF.")
    lines += [f"PARAMETER stop {_quoted(t)}" for t in stop_tokens(tokenizer, pieces, generation_eos)]
    return "\n".join(lines) + "\n"
