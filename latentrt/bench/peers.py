"""The OpenVINO peers as benchmark baselines: optimum-intel and OpenVINO GenAI, each in its own venv.

A CPU user who wants speed picks one of these, not diffusers, so ``latentrt bench`` measures them
next to latentrt on the same weights (``baselines = ["diffusers", "optimum-intel", "openvino-genai"]``):

- ``optimum-intel``: ``OVDiffusionPipeline`` (``OVLatentConsistencyModelPipeline`` for an LCM folder),
  the Python pipeline FastSD CPU uses, reshaped to the scenario's static size;
- ``openvino-genai``: GenAI's C++ ``Text2ImagePipeline``, reshaped likewise.

Both run the OpenVINO IR that optimum-intel exports from the diffusers folder the bundle was
exported from (:func:`ensure_ir`, once per bundle, cached under ``<bench cache>/peer-ir``), with the
benchmark's thread count and OpenVINO's default inference precision (bf16 on AMX CPUs). Each peer
runs in a child process of its own venv (:mod:`.peer_venv`, :mod:`.peer_run`), so its memory is its
own, as with ``isolate``; with ``cold_start`` a second child loads the (now cached) peer and makes
one image: the first load of an already-used model in a new process, as latentrt's second load.

Same weights: transformers >= 5.2x saves CLIP text encoders without the ``text_model.`` key prefix,
which the peers' transformers 5.5 does not map: it re-initialises the text encoder at random and says
so only in a log line. :func:`peer_folder` hands the exporter a view of the folder whose text
encoders carry the old key layout (a header rewrite of the safetensors files, no tensor is touched),
the export reports what its transformers loaded (an unread weight stops the run), and every peer
image gets its PSNR against the diffusers fp32 image with the same noise (:data:`SAME_WEIGHTS_DB`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

#: below this PSNR against diffusers fp32 (same weights and noise) a peer did not run the same model
SAME_WEIGHTS_DB = 30.0
#: bumped when the export changes what a cached peer IR holds
IR_FORMAT = 1


@dataclass(frozen=True)
class Peer:
    name: str
    #: pinned requirements of its venv (optimum-intel 2.2 needs transformers < 5.6, huggingface-hub < 1.22)
    requirements: tuple[str, ...]
    #: installed as dependencies but removed (see :func:`latentrt.bench.peer_venv.ensure_python`)
    uninstall: tuple[str, ...] = ()
    library: str = ""


OPENVINO = ("openvino==2026.4.1", "openvino-tokenizers==2026.4.1.0")
PEERS = {
    # torchvision: optimum-intel depends on it, but PyPI's wheel is built for CUDA torch and its ops fail
    # to load next to the CPU torch (transformers then refuses to import); diffusion never uses it
    "optimum-intel": Peer("optimum-intel", ("optimum-intel[openvino,diffusers]==2.2.0", "optimum==2.3.0", *OPENVINO,
                                            "nncf==3.4.0", "transformers==5.5.4", "diffusers==0.39.0",
                                            "huggingface-hub==1.21.0", "torch==2.13.0", "psutil"),
                          uninstall=("torchvision",), library="optimum-intel"),
    "openvino-genai": Peer("openvino-genai", ("openvino-genai==2026.4.1.0", *OPENVINO, "numpy", "psutil"),
                           library="openvino-genai"),
}
#: the peer whose venv exports the IR that every peer runs
EXPORTER = "optimum-intel"
#: what reports and checks group as "the peers"
NAMES = tuple(PEERS)


class PeerError(RuntimeError):
    """A peer could not be set up on the benchmark's weights."""


def python_of(name: str, progress: Callable[[str], None] = print) -> Path:
    from .peer_venv import ensure_python

    p = PEERS[name]
    return ensure_python(p.name, p.requirements, p.uninstall, progress=progress)


def peer_env(extra_path: Path) -> dict:
    """The environment of a peer process: only ``extra_path`` (a folder holding a ``latentrt`` link to
    this package's source) on PYTHONPATH, never the project's site-packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(extra_path)
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _source_link(tmp: Path) -> Path:
    """``tmp/path/latentrt`` -> this package: the peer imports the harness's stdlib-only modules from it."""
    import latentrt

    root = tmp / "path"
    root.mkdir(exist_ok=True)
    link = root / "latentrt"
    if not link.exists():
        link.symlink_to(Path(latentrt.__file__).resolve().parent, target_is_directory=True)
    return root


# -- the weights the peers read ---------------------------------------------------------------------
def _safetensors_keys(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def needs_legacy_keys(text_encoder: Path) -> bool:
    """Whether a CLIP text encoder folder was saved without the ``text_model.`` key prefix (transformers
    >= 5.2x), which older transformers does not read."""
    files = sorted(text_encoder.glob("*.safetensors"))
    keys = [k for f in files for k in _safetensors_keys(f)[1] if k != "__metadata__"]
    return bool(keys) and not any(k.startswith("text_model.") for k in keys)


def _legacy_key(key: str) -> str:
    return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key


def write_legacy_keys(src: Path, dst: Path) -> None:
    """Copy a CLIP text encoder folder with every tensor under its pre-5.2x key (``text_model.`` prefix;
    ``text_projection`` stays): only the safetensors headers (and a shard index) are rewritten."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            n, header = _safetensors_keys(f)
            new = json.dumps({(k if k == "__metadata__" else _legacy_key(k)): v for k, v in header.items()},
                             separators=(",", ":")).encode()
            new += b" " * (-len(new) % 8)  # keep the data 8-byte aligned, as safetensors writes it
            with open(f, "rb") as fin, open(dst / f.name, "wb") as fout:
                fin.seek(8 + n)
                fout.write(struct.pack("<Q", len(new)) + new)
                shutil.copyfileobj(fin, fout, 1 << 24)
        elif f.name.endswith(".safetensors.index.json"):
            index = json.loads(f.read_text())
            index["weight_map"] = {_legacy_key(k): v for k, v in index.get("weight_map", {}).items()}
            (dst / f.name).write_text(json.dumps(index, indent=2))
        else:
            shutil.copy2(f, dst / f.name)


def peer_folder(folder: Path, out: Path) -> tuple[Path, list[str]]:
    """``out``: a view of diffusers ``folder`` (links) whose text encoders are in the old key layout
    where needed; returns it and the text encoders that were rewritten."""
    out.mkdir(parents=True, exist_ok=True)
    rewritten = []
    for entry in folder.iterdir():
        target = out / entry.name
        if entry.is_dir() and entry.name.startswith("text_encoder") and needs_legacy_keys(entry):
            write_legacy_keys(entry, target)
            rewritten.append(entry.name)
        else:
            target.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return out, rewritten


def ensure_ir(bundle: Path, cache_dir: Path | None, progress: Callable[[str], None] = print) -> Path:
    """The OpenVINO IR folder of the peers for ``bundle``'s weights, exported once by optimum-intel."""
    from .env import bundle_hash
    from .models import default_cache_dir, model_folder_of

    folder = model_folder_of(bundle)
    if folder is None:
        raise PeerError(f"{bundle}: the diffusers folder it was exported from is gone, so the peers cannot run on "
                        "the same weights; re-export the bundle or leave the peers out of baselines")
    exporter = PEERS[EXPORTER]
    key = hashlib.sha256(json.dumps([bundle_hash(bundle), str(folder.resolve()), exporter.requirements, IR_FORMAT])
                         .encode()).hexdigest()[:12]
    out = Path(cache_dir or default_cache_dir()) / "peer-ir" / f"{folder.name}-{key}"
    if (out / "latentrt-peer.json").is_file():
        return out
    python = python_of(EXPORTER, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".peer-ir-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        view, rewritten = peer_folder(folder, tmp / "folder")
        progress(f"exporting {folder.name} to OpenVINO IR with {EXPORTER} for the peers (once)"
                 + (f"; {', '.join(rewritten)} re-keyed for its transformers" if rewritten else ""))
        ir = tmp / "ir"
        t0 = time.perf_counter()
        r = _run_peer(python, ["export", str(view), str(ir)], tmp)
        info = json.loads(r.strip().splitlines()[-1])
        missing = info["text_encoder_loading"].get("missing_keys") or []
        if missing:
            raise PeerError(f"{EXPORTER}'s transformers did not read {len(missing)} text-encoder weights of {folder} "
                            f"(e.g. {missing[:3]}): it would run a re-initialised text encoder, not the same model")
        shutil.rmtree(ir / "model_cache", ignore_errors=True)
        meta = {"source": str(folder), "bundle_hash": bundle_hash(bundle), "rekeyed_text_encoders": rewritten,
                "export_s": time.perf_counter() - t0, **info}
        (ir / "latentrt-peer.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(ir, out)
    return out


def _run_peer(python: Path, args: list[str], tmp: Path) -> str:
    """Run ``peer_run.py ARGS`` with ``python`` and return its stdout (or raise with its stderr)."""
    import subprocess

    script = Path(__file__).with_name("peer_run.py")
    r = subprocess.run([str(python), str(script), *args], capture_output=True, text=True, encoding="utf-8", errors="replace", stdin=subprocess.DEVNULL,
                       env=peer_env(_source_link(tmp)))
    if r.returncode != 0:
        tail = "\n".join(r.stderr.strip().splitlines()[-20:])
        raise PeerError(f"{python} {script.name} {args[0]} failed (exit status {r.returncode}):\n{tail}")
    return r.stdout


# -- measuring --------------------------------------------------------------------------------------
def replay_noise(sc, folder: Path):
    """The draws of diffusers' LCM loop for ``sc`` from ``torch.Generator(seed)``: initial latents, then
    one per step but the last (what :class:`.peer_run.ReplayGenerator` serves to GenAI)."""
    import numpy as np

    from latentrt.runtime.random import TorchGeneratorNoise

    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    f = 2 ** (len(vae["block_out_channels"]) - 1)
    shape = (sc.batch, unet["in_channels"], sc.height // f, sc.width // f)
    noise = TorchGeneratorNoise(sc.seed)
    return np.stack([noise.standard_normal(shape) for _ in range(sc.steps)])


def _job(sc, name: str, ir: Path, tmp: Path, load_only: bool) -> Path:
    job_dir = tmp / ("load" if load_only else "run")
    job_dir.mkdir()
    job = {"peer": name, "ir": str(ir), "scenario": sc.name, "prompt": sc.prompt, "height": sc.height,
           "width": sc.width, "steps": sc.steps, "batch": sc.batch, "guidance": sc.guidance, "seed": sc.seed,
           "threads": sc.resolved_threads, "warmup": sc.warmup, "repeats": sc.repeats, "load_only": load_only,
           "noise": str(tmp / "noise.npy")}
    (job_dir / "job.json").write_text(json.dumps(job))
    return job_dir


def measure_peer(runner, sc, bundle: Path, bar, name: str) -> tuple[dict, object]:
    """Peer ``name``'s result record and first image for scenario ``sc`` (always in its own process)."""
    import numpy as np

    from .child import run_job
    from .env import bundle_hash
    from .harness import result_record
    from .models import model_folder_of

    python = python_of(name, bar.note)
    ir = ensure_ir(bundle, runner.cache_dir, bar.note)
    with tempfile.TemporaryDirectory(prefix=f"latentrt-bench-{name}-") as tmp:
        tmp = Path(tmp)
        np.save(tmp / "noise.npy", replay_noise(sc, model_folder_of(bundle)))
        env = peer_env(_source_link(tmp))
        script = str(Path(__file__).with_name("peer_run.py"))
        results = []
        for load_only in ((False, True) if sc.cold_start else (False,)):
            job_dir = _job(sc, name, ir, tmp, load_only)
            bar.note(f"{sc.name}: {name} (its own venv and process{', new process' if load_only else ''})")
            wall = run_job([str(python), script, "measure", str(job_dir)], job_dir, bar, env=env,
                           what=f"scenario {sc.name!r}: peer {name}")
            res = json.loads((job_dir / "result.json").read_text())
            res["wall_s"] = wall
            results.append((res, np.load(job_dir / "image.npy")))
    (run, image), again = results[0], (results[1][0] if len(results) > 1 else None)
    cold = {"load_s": run["load_s"], "first_image_s": run["first_image_s"], "load_first_s": run["load_s"],
            "import_s": run["import_s"], "model_cache_warm": run["model_cache_warm"]}
    if again is not None:
        cold.update(load_second_s=again["load_s"], first_image_second_s=again["first_image_s"],
                    import_second_s=again["import_s"],
                    cold_start_s=again["load_s"] + again["first_image_s"],
                    note="load_first_s: the measuring process (model cache warm: model_cache_warm); load_second_s "
                         "and cold_start_s: a new process on the now-cached model, load + first image; imports "
                         "(import_s: torch and optimum, or openvino_genai) are timed apart")
    prec = run["compute_precision"]
    extra = {
        "compute_precision": {s: prec for s in ("text_encoder", "unet", "vae_decoder")},
        "cold_start": cold,
        "memory": {**run["memory"], "weight_bytes": run["weight_bytes"], "own_process": True},
        "baseline": {"library": PEERS[name].library, "pipeline": run["pipeline"], "versions": run["versions"],
                     "shapes": f"static (reshaped to {sc.batch}x{sc.height}x{sc.width})", "ir": str(ir),
                     "python": str(python)},
        "bundle": {"path": str(bundle), "hash": bundle_hash(bundle)},
        "process": {"isolated": True, "pid": run["pid"], "wall_s": run["wall_s"]},
    }
    rec = result_record(run_id=runner.run_id, sc=sc, system=name, vae="full", precision="fp32", e2e=run["e2e"],
                        timings=run["timings"], extra=extra)
    rec["backend"] = "openvino"
    return rec, image
