"""The core imports no ML framework (SPEC §2), proven in a clean subprocess; and its packages import one way
(commands -> runs -> train -> data, methods -> the backend protocol and the shared basics), proven by reading them."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import overnight

FRAMEWORKS = ("mlx", "torch", "transformers", "peft", "bitsandbytes")
SRC = Path(overnight.__file__).parent

# A package may import its own modules and those of a lower layer, never one of its own layer or a higher one:
# commands -> runs -> (methods, integrations, models) -> train -> data -> distributed -> backend (the protocol and
# what both backends agree on) -> config -> (errors, fsutil).
LAYERS = {
    "commands": 8,
    "runs": 7,
    "methods": 6, "integrations": 6, "models": 6,
    "train": 5,
    "data": 4,
    "distributed": 3,
    "backend": 2,
    "config": 1,
    "errors": 0, "fsutil": 0,
}


def core_modules() -> list[str]:
    names = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.append(".".join(("overnight",) + (parts[:-1] if parts[-1] == "__init__" else parts)))
    return names


def test_core_modules_import_no_ml_framework():
    modules = core_modules()
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert len(modules) >= 30 and "overnight.train.loop" in modules and "overnight.runs.lifecycle" in modules


def _imported(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (the core imports overnight.* by name)")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("overnight."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "overnight":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("overnight."))
    return found


def test_packages_import_one_way():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[0] in ("__init__", "__main__"):
            continue
        own = parts[0]
        for other in _imported(path) - {own, "backends"}:
            if other not in LAYERS:
                wrong.append(f"{path.relative_to(SRC)} imports overnight.{other}, which is no package of the core")
            elif LAYERS[other] >= LAYERS[own]:
                wrong.append(f"{path.relative_to(SRC)} ({own}) imports overnight.{other}")
    assert wrong == []


def test_the_core_names_no_backend_module_outside_the_registry():
    # `if backend == ...` and direct imports of a backend module belong to the registry (overnight/backend) alone
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                 if "overnight.backends." in p.read_text() and p.relative_to(SRC).parts[0] != "backend"]
    assert offenders == []


def test_backends_are_found_by_name_without_importing_them():
    from overnight.backend import BACKENDS

    assert set(BACKENDS) == {"mlx", "torch"}
    assert all(module.startswith("overnight.backends.") for module, _, _ in BACKENDS.values())
