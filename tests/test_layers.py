"""The import rules between layers, checked by parsing every module (no imports executed):

- spec, plan, records, layout, results and storage import neither torch nor ray, not even
  through another qlora_ray module (results read from a URI without Ray); each module of the
  spec and results packages is checked on its own;
- only the runtime package imports ``ray.tune`` or ``ray.train``; only it and ``cluster``
  (Ray Core checks) import ray at all, and its pure parts (capacity, experiment, faults) do not;
- only the training side (train, loss, evaluate, model, data) and ``cluster``'s on-node probe
  import torch, and the training side never reaches ray: it receives ``report``;
- importing the runtime changes no environment variable.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qlora_ray"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: Dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> Set[str]:
    """Every module ``name`` imports, anywhere in the file (functions included), as dotted names."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            # `from ray import tune` / `from qlora_ray import results` import submodules.
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _closure(name: str) -> Dict[str, str]:
    """Third-party imports reachable from ``name`` through qlora_ray modules: import -> via module."""
    seen, stack, found = set(), [name], {}
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        for imported in _imports(current):
            if imported in MODULES:
                stack.append(imported)
            elif not imported.startswith("qlora_ray"):
                found.setdefault(imported, current)
    return found


def _top(imported: str) -> str:
    return imported.split(".")[0]


def _present(names):
    missing = [n for n in names if n not in MODULES]
    return [pytest.param(n, marks=pytest.mark.skip(reason=f"{n} not written yet")) if n in missing else n
            for n in names]


def _in(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


PURE_PACKAGES = ["qlora_ray.spec", "qlora_ray.results"]
PURE = [*PURE_PACKAGES, "qlora_ray.plan", "qlora_ray.records", "qlora_ray.layout", "qlora_ray.storage",
        "qlora_ray.mirror", *sorted(n for n in MODULES if any(n.startswith(p + ".") for p in PURE_PACKAGES))]
TRAINING_SIDE = ["qlora_ray.train", "qlora_ray.loss", "qlora_ray.evaluate", "qlora_ray.data", "qlora_ray.model"]
MAY_IMPORT_RAY = ["qlora_ray.runtime", "qlora_ray.cluster"]
# What works on a trained adapter (eval, merge, export) and the base-figure cache's key: torch, never Ray.
ADAPTER_SIDE = ["qlora_ray.adapters", "qlora_ray.base_cache", "qlora_ray.export", "qlora_ray.lora_gguf",
                "qlora_ray.hub", "qlora_ray.converter", "qlora_ray.modelfile"]
MAY_IMPORT_TORCH = [*TRAINING_SIDE, "qlora_ray.kernels", *ADAPTER_SIDE,
                    "qlora_ray.cluster"]  # cluster: the 4-bit probe, on the node it runs on
RUNTIME_PURE = ["qlora_ray.runtime.capacity", "qlora_ray.runtime.experiment", "qlora_ray.runtime.faults"]


def test_modules_found():
    assert {*PURE, "qlora_ray.runtime", "qlora_ray.runtime.trial", "qlora_ray.train", "qlora_ray.train.loop",
            "qlora_ray.loss", "qlora_ray.spec.load", "qlora_ray.results.read"} <= set(MODULES)


@pytest.mark.parametrize("name", _present(PURE))
def test_pure_layers_import_neither_torch_nor_ray(name):
    bad = {imp: via for imp, via in _closure(name).items() if _top(imp) in ("torch", "ray")}
    assert not bad, f"{name} reaches {', '.join(f'{i} (imported by {v})' for i, v in sorted(bad.items()))}"


def test_only_the_runtime_imports_ray_tune_and_ray_train():
    users = sorted(name for name in MODULES
                   if any(_in(imp, ("ray.tune", "ray.train")) for imp in _imports(name)))
    assert users and all(_in(name, ["qlora_ray.runtime"]) for name in users), users


def test_who_imports_ray_and_torch():
    ray_users = sorted(n for n in MODULES if any(_top(i) == "ray" for i in _imports(n)))
    torch_users = sorted(n for n in MODULES if any(_top(i) == "torch" for i in _imports(n)))
    assert [n for n in ray_users if not _in(n, MAY_IMPORT_RAY)] == []
    assert [n for n in torch_users if not _in(n, MAY_IMPORT_TORCH)] == []
    assert [n for n in ray_users if n in RUNTIME_PURE] == []  # capacity, experiment, faults: no Ray calls


@pytest.mark.parametrize("name", _present([*TRAINING_SIDE, "qlora_ray.kernels", *ADAPTER_SIDE]))
def test_training_side_never_imports_ray(name):
    bad = {imp: via for imp, via in _closure(name).items() if _top(imp) == "ray"}
    assert not bad, f"{name} reaches {', '.join(f'{i} (imported by {v})' for i, v in sorted(bad.items()))}"


def test_the_checker_sees_imports_inside_functions():
    """Guard against a checker that passes because it parses nothing."""
    assert "ray.tune" in _imports("qlora_ray.runtime.trial")
    assert "ray.train.torch" in _imports("qlora_ray.runtime.trial")  # imported inside a function
    assert any(_top(i) == "ray" for i in _closure("qlora_ray.runtime"))


def test_importing_the_runtime_sets_no_environment_variable():
    """Ray's reporter and local-process settings are applied around the calls that need them,
    never at import (a library import must not change its host's environment)."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, os, ray, ray.train, ray.tune; before = dict(os.environ); "
            "import qlora_ray.runtime, qlora_ray.runtime.trial, qlora_ray.runtime.grid; "
            "print(json.dumps(sorted(set(os.environ.items()) ^ set(before.items()))))")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_production_code_reads_no_test_hooks():
    """Faults are injected by tests through ``runtime.faults.install``; no environment variable
    can make a real run kill or crash itself."""
    readers = [name for name, path in MODULES.items() if "QLORA_RAY_TEST" in path.read_text(encoding="utf-8")]
    assert readers == []
