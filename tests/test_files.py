"""publish_dir: a folder appears whole or not at all."""

from __future__ import annotations

import pytest

from qlora_ray.files import publish_dir


def test_publish_dir_replaces_the_folder_only_when_the_block_succeeds(tmp_path):
    final = tmp_path / "deep" / "adapter"
    with publish_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".adapter.")
        (tmp / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one"

    with pytest.raises(RuntimeError, match="mid-write"):
        with publish_dir(final) as tmp:
            (tmp / "a.txt").write_text("two, half written")
            raise RuntimeError("mid-write")
    assert (final / "a.txt").read_text() == "one"  # the earlier folder is intact
    assert [p.name for p in final.parent.iterdir()] == ["adapter"]  # no temp folder left

    with publish_dir(final) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]  # replaced, not merged
