"""Rendering and tokenizing: a chat through the tokenizer's chat template, with labels only on
what the assistant says (its reply and its end-of-turn token).

Chat templates rarely carry ``{% generation %}`` markers, so the assistant spans are found by
rendering prefixes. For the k-th message, an assistant reply, the template renders the
conversation before it with ``add_generation_prompt=True``: that string is exactly the prompt
the model sees at inference, so the target starts where it ends (if a template's generation
prompt stops short of text it writes next, such as a newline, the model must produce that
text itself, so it is a target). The target ends after the first end-of-turn special token
that follows the reply's text (``<|im_end|>``, ``</s>``, ``<|eot_id|>``...), so the model learns
to stop; what the template writes after it (a newline) is not trained. Where the history
renders differently once later turns exist (SmolLM2 adds a default system prompt only then),
the target starts at the reply text itself. Rows whose reply cannot be located are skipped as
``template_mismatch`` rather than trained on the wrong tokens.

The full render is tokenized once (as inference tokenizes it) and a token is a target when it
starts inside a target span, by the fast tokenizer's character offsets. Tokenizing the pieces
separately and concatenating does not work in general: SentencePiece tokenizers (TinyLlama)
can add a word-start marker at the start of each piece, so the pieces' tokens differ from the
full render's. Tests check the decoded targets equal each reply plus its end token.

Plain ``text`` rows are tokenized with the tokenizer's own special tokens (BOS for Llama
tokenizers) plus EOS, and every token is a target. In all cases the first token of an example
is never a target: no position predicts it, and in a packed row the position before it belongs
to another example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from qlora_ray.data.formats import BadRow, Chat, Record, Text
from qlora_ray.data.records import Example
from qlora_ray.errors import UserError

IGNORE = -100  # the label value torch's cross-entropy (and HF models) skip

Span = Tuple[int, int]  # [start, end) character offsets into the rendered text


@dataclass
class Encoded:
    """A tokenized record before truncation."""

    input_ids: List[int]
    labels: List[int]


class Encoder:
    """Turns records into token ids and labels for one tokenizer and template."""

    def __init__(self, tokenizer: Any, chat_template: Optional[str], train_on_prompt: bool):
        self.tokenizer = tokenizer
        self.template = chat_template or _own_template(tokenizer)
        self.train_on_prompt = train_on_prompt
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no EOS token; the model could not learn to stop")
        self._end_markers: Optional[List[str]] = None

    # ------------------------------------------------------------ public

    def encode(self, records: Sequence[Record]) -> List[Encoded | BadRow]:
        """Tokenize many records at once (one batched tokenizer call per kind)."""
        out: List[Optional[Encoded | BadRow]] = [None] * len(records)
        chats = [(i, r) for i, r in enumerate(records) if isinstance(r, Chat)]
        texts = [(i, r) for i, r in enumerate(records) if isinstance(r, Text)]
        rendered = []
        for i, chat in chats:
            try:
                rendered.append((i, *self._render_with_spans(chat)))
            except BadRow as bad:
                out[i] = bad
        if rendered:
            enc = self.tokenizer([text for _, text, _ in rendered], add_special_tokens=False,
                                 return_offsets_mapping=True)
            for (i, _, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
                out[i] = self._chat_labels(ids, offsets, spans)
        if texts:
            enc = self.tokenizer([r.text for _, r in texts], add_special_tokens=True)
            eos = self.tokenizer.eos_token_id
            for (i, _), ids in zip(texts, enc["input_ids"]):
                ids = list(ids) if ids and ids[-1] == eos else [*ids, eos]
                out[i] = Encoded(ids, [IGNORE, *ids[1:]])
        return out

    # ------------------------------------------------------------ chat rendering

    def _render(self, messages: List[dict], generation_prompt: bool) -> str:
        if self.template is None:
            raise UserError("the tokenizer has no chat template and data.chat_template is not set; "
                            "set data.chat_template (a Jinja template) or use data.format: text")
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False,
            add_generation_prompt=generation_prompt)

    def _render_with_spans(self, chat: Chat) -> Tuple[str, List[Span]]:
        """The rendered conversation and the character spans to train on."""
        try:
            full = self._render(chat.messages, generation_prompt=False)
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - templates raise arbitrary errors (e.g. "roles must alternate")
            raise BadRow("template_error") from None
        if self.train_on_prompt:
            return full, [(0, len(full))]
        spans, cursor = [], 0
        for k, message in enumerate(chat.messages):
            if message["role"] != "assistant":
                continue
            start, exact = self._reply_start(chat.messages[:k], full, cursor)
            reply = message["content"].strip()  # templates often trim the content
            found = full.find(reply, start, self._message_end(chat.messages[:k + 1], full))
            # Between the generation prompt and the reply no turn may close, or we found the
            # reply's text somewhere else.
            if found < 0 or (exact and any(m in full[start:found] for m in self.end_markers)):
                raise BadRow("template_mismatch")
            end = self._turn_end(full, found + len(reply))
            spans.append((start if exact else found, end))
            cursor = end
        return full, spans

    def _reply_start(self, before: List[dict], full: str, cursor: int) -> Tuple[int, bool]:
        """Where the assistant's output starts, and whether that is exact.

        Exact: right after the generation prompt, when rendering the history with it gives a
        prefix of the full text. Otherwise (e.g. a default system prompt the template adds
        only once messages exist) search for the reply after the rendered history.
        """
        for generation_prompt in (True, False):
            try:
                prefix = self._render(before, generation_prompt=generation_prompt)
            except Exception:  # noqa: BLE001 - e.g. a template that cannot render an empty history
                continue
            if full.startswith(prefix) and len(prefix) >= cursor:
                return len(prefix), generation_prompt
        return cursor, False

    def _message_end(self, upto: List[dict], full: str) -> int:
        """Where the render of the conversation up to this message ends (else the full length)."""
        try:
            prefix = self._render(upto, generation_prompt=False)
        except Exception:  # noqa: BLE001 - a template that refuses a partial conversation
            return len(full)
        return len(prefix) if full.startswith(prefix) else len(full)

    def _turn_end(self, full: str, reply_end: int) -> int:
        """The end of the end-of-turn token that follows the reply (or the reply's end if none)."""
        best = None
        for marker in self.end_markers:
            at = full.find(marker, reply_end)
            if at >= 0 and not full[reply_end:at].strip() and (best is None or at < best[0]):
                best = (at, at + len(marker))
        return best[1] if best else reply_end

    @property
    def end_markers(self) -> List[str]:
        """Special tokens that can close a turn: EOS, and other specials except those that open one."""
        if self._end_markers is None:
            tok = self.tokenizer
            skip = {tok.bos_token, tok.pad_token, tok.unk_token} - {tok.eos_token}
            header = self._generation_header()
            specials = [t.content for t in tok.added_tokens_decoder.values() if t.special]
            markers = [tok.eos_token] + [t for t in specials if t not in skip and t not in header]
            self._end_markers = list(dict.fromkeys(m for m in markers if m))
        return self._end_markers

    def _generation_header(self) -> str:
        """What the template writes to open an assistant turn (its tokens never end one)."""
        history = [{"role": "user", "content": "x"}]
        try:
            with_prompt = self._render(history, generation_prompt=True)
            without = self._render(history, generation_prompt=False)
        except Exception:  # noqa: BLE001 - unusual templates: assume no header
            return ""
        return with_prompt[len(without):] if with_prompt.startswith(without) else with_prompt

    def _chat_labels(self, ids: List[int], offsets: List[Span], spans: List[Span]) -> Encoded:
        labels = [IGNORE] * len(ids)
        for t, (start, _) in enumerate(offsets):
            if t > 0 and any(a <= start < b for a, b in spans):
                labels[t] = ids[t]
        return Encoded(list(ids), labels)


def truncate(encoded: Encoded, max_len: int, row: int) -> Tuple[Example, bool]:
    """Cut to ``max_len`` tokens (keeping the start); raise BadRow if no target is left."""
    cut = len(encoded.input_ids) > max_len
    labels = encoded.labels[:max_len]
    if all(label == IGNORE for label in labels):
        raise BadRow("no_target_after_truncation")
    return Example(encoded.input_ids[:max_len], labels, row), cut


def render_example(example: Example, tokenizer: Any) -> str:
    """The example's text with every trained token run wrapped in ``[[ ]]``."""
    parts, run, trained = [], [], None
    for token, label in zip(example.input_ids, example.labels):
        is_target = label != IGNORE
        if run and is_target != trained:
            parts.append(_decode_run(tokenizer, run, trained))
            run = []
        run.append(token)
        trained = is_target
    if run:
        parts.append(_decode_run(tokenizer, run, trained))
    return "".join(parts)


def _decode_run(tokenizer: Any, ids: List[int], trained: bool) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return f"[[{text}]]" if trained else text


def _own_template(tokenizer: Any) -> Optional[str]:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is for chat
        template = template.get("default")
    return template
