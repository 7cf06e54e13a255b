"""llama.cpp's GGUF converters, obtained once into the cache and run in a subprocess.

Why these scripts and not our own GGUF writer: ``convert_hf_to_gguf.py`` and
``convert_lora_to_gguf.py`` are what llama.cpp, Ollama and LM Studio users run; they know
every architecture's tensor layout (Llama's rotary Q/K permutation included), name the
BPE pre-tokenizer by hash so llama.cpp splits text as the HF tokenizer does, and write the
chat template and special tokens. The ``gguf`` package alone (a dependency already, used to
read the offline model) writes files and Q8_0 blocks but knows none of that per-model logic,
so reimplementing it would be a second, unmaintained converter.

How they are obtained, without vendoring them: the PyPI source distribution of
``llama-cpp-python`` carries llama.cpp at a fixed commit. ``pip download`` fetches it (about
50 MB, a minute, once), its SHA-256 is checked against the pin below, and only the two
scripts and their ``gguf-py`` package are unpacked into
``<data.cache_dir>/converters/llama.cpp-<version>/``. The scripts import ``mistral_common``
and ``sentencepiece`` at module level; those are installed with ``pip install --target``
into the same folder, not into the user's environment (``mistral_common`` pins
``numpy<2.4``, which would otherwise downgrade the environment's numpy). torch, transformers
and safetensors come from the running environment. On a machine without PyPI, copy the
sdist over and pass it with ``--converter-sdist``; the dependency step still needs an index
(``pip install --target`` honours ``PIP_INDEX_URL`` / ``PIP_FIND_LINKS``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from qlora_ray.errors import UserError
from qlora_ray.files import publish_dir

LLAMA_CPP_PYTHON = "0.3.16"
SDIST_SHA256 = "34ed0f9bd9431af045bb63d9324ae620ad0536653740e9bb163a2e1fcb973be6"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
REQUIREMENTS = ("mistral-common==1.13.1", "sentencepiece==0.2.3")
_SCRIPTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")
_VENDORED = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
_MARKER = "converter.json"
_TAIL_LINES = 15


@dataclass(frozen=True)
class Converter:
    """An unpacked converter: ``root`` holds the scripts and ``gguf-py/``, ``site`` their extra packages."""

    root: Path

    @property
    def site(self) -> Path:
        return self.root / "site"

    def run(self, script: str, args: Sequence[str], log_file: Path) -> None:
        """Run ``script`` with ``args`` in a subprocess; its output goes to ``log_file``.

        Raises :class:`UserError` with the last lines of that output when it fails.
        """
        if script not in _SCRIPTS:
            raise ValueError(f"unknown converter script {script}")
        env = dict(os.environ)
        env.pop("NO_LOCAL_GGUF", None)  # the scripts must use their own gguf-py, matched to them
        env["PYTHONPATH"] = str(self.site)  # torch, transformers, safetensors: the running environment's
        command = [sys.executable, str(self.root / script), *map(str, args)]
        with open(log_file, "w", encoding="utf-8") as log:
            done = subprocess.run(command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, check=False)
        if done.returncode != 0:
            tail = log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-_TAIL_LINES:]
            raise UserError(f"the GGUF converter ({script}, llama.cpp from llama-cpp-python {LLAMA_CPP_PYTHON}) "
                            f"failed with exit status {done.returncode}:\n  " + "\n  ".join(tail)
                            + "\nnothing was written.")


def converter_dir(cache_dir: str) -> Path:
    return Path(os.path.expanduser(cache_dir)) / "converters" / f"llama.cpp-{LLAMA_CPP_PYTHON}"


def ensure_converter(cache_dir: str, sdist: Optional[Path] = None, say=print) -> Converter:
    """The converter in ``<cache_dir>/converters/``, fetched, checked and unpacked on first use.

    ``sdist``: a local copy of ``llama_cpp_python-<version>.tar.gz`` to use instead of
    downloading it (its hash is checked all the same). ``say`` reports the slow first-time steps.
    """
    from filelock import FileLock

    final = converter_dir(cache_dir)
    if (final / _MARKER).is_file():
        return Converter(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / _MARKER).is_file():
            return Converter(final)
        with publish_dir(final) as tmp:
            if sdist is None:
                say(f"downloading llama.cpp's GGUF converter (llama-cpp-python {LLAMA_CPP_PYTHON} source, ~50 MB, once)")
                sdist = _download(tmp)
            _check_hash(Path(sdist))
            _unpack(Path(sdist), tmp)
            say(f"installing the converter's packages into {final / 'site'} (once): {', '.join(REQUIREMENTS)}")
            _pip(["install", "--quiet", "--disable-pip-version-check", "--no-warn-script-location",
                  "--target", str(tmp / "site"), *REQUIREMENTS], "install the converter's packages")
            for leftover in tmp.glob("*.tar.gz"):
                leftover.unlink()
            (tmp / _MARKER).write_text(json.dumps({"llama_cpp_python": LLAMA_CPP_PYTHON, "sdist_sha256": SDIST_SHA256,
                                                   "requirements": list(REQUIREMENTS)}, indent=1), encoding="utf-8")
    return Converter(final)


def _pip(args: List[str], what: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        tail = "\n  ".join((done.stdout + done.stderr).strip().splitlines()[-_TAIL_LINES:])
        raise UserError(f"could not {what} with pip (exit status {done.returncode}):\n  {tail}\n"
                        f"On a machine without PyPI, download {SDIST_NAME} elsewhere (pip download "
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON} --no-deps --no-binary :all:) and pass it with "
                        "--converter-sdist; point PIP_INDEX_URL or PIP_FIND_LINKS at a mirror for "
                        + ", ".join(REQUIREMENTS) + ".")


def _download(folder: Path) -> Path:
    _pip(["download", "--quiet", "--disable-pip-version-check", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
          "--no-deps", "--no-binary", ":all:", "--dest", str(folder)], f"download {SDIST_NAME}")
    path = folder / SDIST_NAME
    if not path.is_file():
        raise UserError(f"pip download did not leave {SDIST_NAME} in {folder}")
    return path


def _check_hash(sdist: Path) -> None:
    if not sdist.is_file():
        raise UserError(f"--converter-sdist: '{sdist}' not found")
    digest = hashlib.sha256()
    with open(sdist, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != SDIST_SHA256:
        raise UserError(f"{sdist}: SHA-256 {digest.hexdigest()} is not that of {SDIST_NAME} ({SDIST_SHA256}); "
                        "refusing to run code from it")


def _unpack(sdist: Path, dest: Path) -> None:
    """Only the two scripts and ``gguf-py/`` (the data filter refuses links and paths leaving ``dest``)."""
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            if not member.name.startswith(_VENDORED):
                continue
            rel = member.name[len(_VENDORED):]
            if rel in _SCRIPTS or rel.startswith("gguf-py/gguf/"):
                member.name = rel
                members.append(member)
        if not any(m.name in _SCRIPTS for m in members):
            raise UserError(f"{sdist}: no llama.cpp converter scripts under {_VENDORED}")
        tar.extractall(dest, members=members, filter="data")
