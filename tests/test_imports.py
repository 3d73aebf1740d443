"""The core imports no ML framework (SPEC §2): proven in a clean subprocess."""
import json
import subprocess
import sys
from pathlib import Path

import overnight

FRAMEWORKS = ("mlx", "torch", "transformers", "peft", "bitsandbytes")


def test_core_modules_import_no_ml_framework():
    src = Path(overnight.__file__).parent
    modules = sorted(f"overnight.{p.stem}" for p in src.glob("*.py") if p.stem not in ("__main__",))
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert len(modules) >= 10


def test_backends_are_found_by_name_without_importing_them():
    from overnight.backend import BACKENDS

    assert set(BACKENDS) == {"mlx", "torch"}
    assert all(module.startswith("overnight.backends.") for module, _, _ in BACKENDS.values())
