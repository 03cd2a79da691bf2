"""``latentrt.serve`` runs on the runtime alone: no torch, diffusers, transformers or latentrt.export
(and no Ray outside ``serve/ray_app.py``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import latentrt

SERVE = Path(latentrt.__file__).parent / "serve"

SCRIPT = r"""
import sys, importlib.abc

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers", "ray") or name.startswith("latentrt.export"):
            raise ImportError(f"blocked import of {name}")
        return None

sys.meta_path.insert(0, Block())
import latentrt
from fastapi.testclient import TestClient
from latentrt.cli import build_parser
from latentrt.serve.app import Server, create_app
from latentrt.serve.worker import Worker

build_parser()  # every subcommand registers without the blocked packages
server = Server({"lcm": Worker("lcm", latentrt.load(sys.argv[1])).start()})
server.ready = True
client = TestClient(create_app(server))
r = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "64x64", "seed": 1})
assert r.status_code == 200, r.text
server.stop()
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "ray")
             or m.startswith("latentrt.export"))
print("IMPORTED", bad)
"""


def test_the_server_runs_without_torch_or_export(lcm_bundle):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(lcm_bundle)], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "IMPORTED []" in r.stdout


def test_no_serve_module_imports_export_or_ray():
    for path in SERVE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [("." * node.level) + (node.module or "")] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert "export" not in name.split("."), f"{path.name} imports {name}"
                if path.name != "ray_app.py":
                    assert name.split(".")[0] != "ray", f"{path.name} imports {name}"
