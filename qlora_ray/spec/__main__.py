"""``python -m qlora_ray.spec``: the spec reference table, generated from the schema (kept in README.md)."""

from qlora_ray.spec import reference_markdown

print(reference_markdown())
