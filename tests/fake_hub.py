"""A local folder standing in for the Hugging Face Hub, which the machines the tests run on cannot
reach: an fsspec filesystem registered under the ``hf`` protocol in place of huggingface_hub's
``HfFileSystem``, so ``hf://datasets/me/runs/x`` is ``<root>/datasets/me/runs/x``.

As a script, ``qlora-ray submit`` in this process with the stand-in installed:

    python tests/fake_hub.py HUB_ROOT STAGING_ROOT SPEC [KEY=VALUE ...] [--options]
"""

import sys
from pathlib import Path

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


class FakeHub(DirFileSystem):
    """The Hub as a local folder (``root``)."""

    protocol = "hf"
    cachable = False
    root: Path = Path("/nonexistent")

    def __init__(self, *args, **kwargs):
        super().__init__(path=str(FakeHub.root), fs=LocalFileSystem(auto_mkdir=True))


def install(root: Path) -> None:
    """``hf://`` is ``root`` from now on, in this process."""
    FakeHub.root = Path(root)
    fsspec.register_implementation("hf", FakeHub, clobber=True)


def uninstall() -> None:
    """``hf://`` is the Hub again."""
    from huggingface_hub import HfFileSystem

    # The class itself: a registered class outranks a name, so a name would leave the stand-in in place.
    fsspec.register_implementation("hf", HfFileSystem, clobber=True)


if __name__ == "__main__":
    from qlora_ray import layout
    from qlora_ray.cli import main

    install(Path(sys.argv[1]))
    layout.HUB_STAGING = Path(sys.argv[2])
    sys.argv = ["qlora-ray", "submit", *sys.argv[3:]]
    main()
