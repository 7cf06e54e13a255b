"""YAML read as plain data, strictly: what a spec file or a command-line value may contain.

``yaml.safe_load`` already refuses tags that build Python objects. This reader also refuses:

- aliases (``*name``): a few hundred bytes of nested aliases expand to billions of nodes
  once anything walks the tree (the "billion laughs"), and a spec gains nothing from them;
- duplicate keys: YAML keeps the last one silently, so an earlier ``lr:`` would be lost;
- text that is not UTF-8, and files over :data:`MAX_BYTES` (a spec is a page, not a dataset).

A UTF-8 byte order mark is accepted and dropped.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Tuple

import yaml

MAX_BYTES = 1 << 20  # 1 MiB


class YamlProblem(Exception):
    """Why a text is not acceptable YAML data: ``problems`` as (where, message) pairs."""

    def __init__(self, problems: List[Tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{where}: {message}" for where, message in problems))


class AliasError(yaml.composer.ComposerError):
    """The text uses an alias (``*name``)."""


class _Loader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise AliasError(
                None, None, f"aliases (*{event.anchor}) are not allowed; write the value out",
                event.start_mark)
        return super().compose_node(parent, index)


def decode(data: bytes) -> str:
    """``data`` as text (a leading byte order mark dropped); :class:`YamlProblem` if it is not UTF-8."""
    if len(data) > MAX_BYTES:
        raise YamlProblem([("", f"is {len(data):,} bytes; a spec may be at most {MAX_BYTES:,} bytes")])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise YamlProblem([("", f"is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); "
                                "save it as UTF-8")]) from None


def load(text: str) -> Any:
    """Parse one YAML document as plain data; raise :class:`YamlProblem` (duplicate keys, each by
    key path) or ``yaml.YAMLError`` (syntax, aliases, Python tags)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        duplicates = list(_duplicate_keys(node, ""))
        if duplicates:
            raise YamlProblem(duplicates)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _duplicate_keys(node: Any, prefix: str) -> Iterator[Tuple[str, str]]:
    # Aliases are refused, so this walk is as long as the text.
    if isinstance(node, yaml.MappingNode):
        first_line = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            path = f"{prefix}{key}"
            if key is not None and key in first_line:
                yield path, (f"duplicate key (line {key_node.start_mark.line + 1}; first on line "
                             f"{first_line[key]}): YAML would keep only the last one; keep one")
            elif key is not None:
                first_line[key] = key_node.start_mark.line + 1
            yield from _duplicate_keys(value_node, path + ".")
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, f"{prefix.rstrip('.')}[{i}].")
