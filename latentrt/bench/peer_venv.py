"""Virtual environments of the benchmark's peers, created on demand with pinned versions.

The OpenVINO peers cannot share the project's environment: optimum-intel 2.2 pins
``transformers < 5.6`` and ``huggingface-hub < 1.22`` (the project runs transformers 5.2x and
diffusers 0.42, which needs huggingface-hub >= 1.32). So each peer gets its own venv under
``~/.cache/latentrt/peer-venvs/<name>-<key>`` (``$LATENTRT_PEER_VENVS`` moves the root), made with the
``venv`` module and ``pip install`` of :attr:`Peer.requirements`; ``key`` hashes the requirements and
the Python version, so changing a pin makes a new venv instead of mutating an old one.

A venv is complete only when its ``.latentrt-complete`` stamp exists (written last, atomically);
one without it (an interrupted creation) is removed and made again. Creation holds a file lock, so
two harness processes never build the same venv at once.

``$LATENTRT_PEER_PYTHON`` names an interpreter to use for every peer instead (no venv is made):
for an environment the user prepared, and for the tests, which run the harness logic with the
project's own interpreter as a stand-in where it has the packages a test needs.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

ENV_ROOT = "LATENTRT_PEER_VENVS"
ENV_PYTHON = "LATENTRT_PEER_PYTHON"
STAMP = ".latentrt-complete"


class PeerEnvError(RuntimeError):
    """A peer's virtual environment could not be made (pip failed, no network, ...)."""


def venv_root() -> Path:
    env = os.environ.get(ENV_ROOT)
    return Path(env) if env else Path.home() / ".cache" / "latentrt" / "peer-venvs"


def venv_key(requirements: tuple[str, ...], uninstall: tuple[str, ...] = ()) -> str:
    payload = "\n".join(sorted(requirements)) + f"\n-{sorted(uninstall)}\npython {sys.version_info[0]}.{sys.version_info[1]}"
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def venv_dir(name: str, requirements: tuple[str, ...], uninstall: tuple[str, ...] = ()) -> Path:
    return venv_root() / f"{name}-{venv_key(requirements, uninstall)}"


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], what: str, log_path: Path) -> None:
    with open(log_path, "ab") as log:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise PeerEnvError(f"{what} failed (exit status {r.returncode}); the full log is {log_path}:\n{tail}")


def ensure_python(name: str, requirements: tuple[str, ...], uninstall: tuple[str, ...] = (),
                  progress: Callable[[str], None] = print) -> Path:
    """The Python interpreter of peer ``name``'s venv, made on first use (see the module docstring):
    ``pip install`` of ``requirements``, then ``pip uninstall`` of ``uninstall`` (dependencies a
    requirement declares that would break it here)."""
    override = os.environ.get(ENV_PYTHON)
    if override:
        if not Path(override).is_file():
            raise PeerEnvError(f"${ENV_PYTHON}={override!r} is not an interpreter; unset it to let the harness "
                               "make the peers' virtual environments")
        return Path(override)
    root = venv_dir(name, requirements, uninstall)
    python = root / "bin" / "python"
    if (root / STAMP).is_file():
        return python
    with _locked(root.with_name(root.name + ".lock")):
        if (root / STAMP).is_file():  # another process made it while we waited
            return python
        if root.exists():  # an interrupted creation
            shutil.rmtree(root)
        progress(f"creating the {name} peer's virtual environment in {root} (once; pinned: {' '.join(requirements)})")
        log = root.with_name(root.name + ".log")
        log.write_text("")
        try:
            _run([sys.executable, "-m", "venv", str(root)], f"python -m venv {root}", log)
            if requirements:
                _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
                     f"pip install of the {name} peer's requirements", log)
            if uninstall:
                _run([str(python), "-m", "pip", "uninstall", "-y", "-q", *uninstall], f"pip uninstall {' '.join(uninstall)}", log)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        tmp = root / (STAMP + ".tmp")
        tmp.write_text("\n".join(requirements) + "\n")
        os.replace(tmp, root / STAMP)
    return python
