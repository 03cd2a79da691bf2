"""The runtime never needs torch, diffusers or transformers to run a CPU bundle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import latentrt

RUNTIME = Path(latentrt.__file__).parent / "runtime"
FORBIDDEN = ("torch", "diffusers", "transformers", "latentrt.export")

SCRIPT = r"""
import sys, importlib.abc

class Block(importlib.abc.MetaPathFinder):
    # behave as if these packages were not installed at all
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers") or name.startswith("latentrt.export"):
            raise ImportError(f"blocked import of {name}")
        return None

sys.meta_path.insert(0, Block())
import latentrt
pipe = latentrt.load(sys.argv[1])
out = pipe("a cat", num_inference_steps=2, generator=0, output_type="pil")
out = pipe("a cat", image=out.images[0], strength=0.5, num_inference_steps=2, generator=0, output_type="np")
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers")
             or m.startswith("latentrt.export"))
print("IMPORTED", bad)
assert not bad, bad
"""


def test_cpu_bundle_runs_without_torch_diffusers_transformers(lcm_bundle):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(lcm_bundle)], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "IMPORTED []" in r.stdout


def _module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:  # module level only; lazy imports inside functions are allowed
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative: resolve against the package
                pkg = ".".join(path.relative_to(RUNTIME.parent.parent).with_suffix("").parts[: -node.level])
                mod = f"{pkg}.{mod}" if mod else pkg
            names.add(mod)
    return names


def test_no_runtime_module_imports_heavy_packages_at_module_level():
    offenders = {}
    for path in RUNTIME.rglob("*.py"):
        bad = {m for m in _module_level_imports(path) if m.split(".")[0] in FORBIDDEN[:3]
               or m.startswith("latentrt.export")}
        if bad:
            offenders[str(path.relative_to(RUNTIME))] = sorted(bad)
    assert not offenders, f"runtime modules import heavy packages at module level: {offenders}"
