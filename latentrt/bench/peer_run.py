"""The peers' side of the benchmark: run inside a peer's own virtual environment (:mod:`.peer_venv`).

    python peer_run.py export FOLDER OUT     diffusers folder -> OpenVINO IR folder (optimum-intel's venv)
    python peer_run.py measure JOB_DIR       one peer, one scenario: load, warm-up, timed calls

Started by :mod:`latentrt.bench.peers` with the latentrt source root on ``PYTHONPATH``; it imports only
the standard-library modules of the harness (:mod:`.child`'s progress protocol, :mod:`.memory`), numpy
and the peer's own packages, never latentrt's runtime or its pinned dependencies (the peer venv does
not have them).

``measure`` reads ``JOB_DIR/job.json`` (peer, IR folder, prompt, size, steps, batch, guidance, seed,
threads, warm-up, repeats, ``load_only``) and writes ``result.json`` (load time, per-call end-to-end
and per-stage times, peak memory, IR weight bytes, compute precision, library versions) and
``image.npy`` (the first timed call's images, NHWC float in [0, 1]), as the latentrt child does.

Noise: optimum-intel runs diffusers' own pipeline code, so a ``torch.Generator`` seeded as the
diffusers baseline's gives the very same noise. OpenVINO GenAI draws through its ``Generator``
interface: :class:`ReplayGenerator` serves the tensors that the parent drew with ``torch.Generator``
(``noise.npy``, in diffusers' order: initial latents, then one per LCM step but the last), and refuses
a draw of any other shape, so the three systems see the same noise or the run stops.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from latentrt.bench.child import PipeProgress
from latentrt.bench.env import installed_versions
from latentrt.bench.memory import PeakMemory
from latentrt.manifest import write_json_atomic

#: per-stage names, as latentrt's pipelines name their engines
STAGES = ("text_encoder", "unet", "vae_decoder")
LIBRARIES = ("openvino", "openvino-genai", "openvino-tokenizers", "optimum-intel", "optimum", "transformers",
             "diffusers", "torch", "nncf")


def versions() -> dict:
    return installed_versions(LIBRARIES)


def ov_config(threads: int) -> dict:
    return {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY"}


def default_precision() -> str:
    """The inference precision OpenVINO's CPU plugin picks by default (bf16 on AMX CPUs)."""
    import openvino as ov

    t = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    return {"bf16": "bf16", "f32": "fp32", "f16": "fp16"}.get(t.to_string(), t.to_string())


def ir_weight_bytes(ir: Path) -> int:
    return sum(p.stat().st_size for p in Path(ir).rglob("*.bin") if "model_cache" not in p.parts)


# -- export -----------------------------------------------------------------------------------------
def export(folder: str, out: str) -> dict:
    """Export a diffusers folder to OpenVINO IR with optimum-intel (what ``optimum-cli export openvino``
    does), fp32 weights (the CPU plugin computes in its default precision either way). Returns what
    the text encoder's loading reported, so the parent can check that the weights were read."""
    from optimum.intel import OVDiffusionPipeline
    from transformers import CLIPTextModel

    _, info = CLIPTextModel.from_pretrained(str(Path(folder) / "text_encoder"), output_loading_info=True)
    pipe = OVDiffusionPipeline.from_pretrained(folder, export=True, compile=False, load_in_8bit=False)
    pipe.save_pretrained(out)
    # GenAI tokenizes in OpenVINO too: the tokenizer as openvino_tokenizer.xml (optimum-cli does the same)
    from optimum.exporters.openvino.convert import export_tokenizer
    from transformers import AutoTokenizer

    export_tokenizer(AutoTokenizer.from_pretrained(str(Path(folder) / "tokenizer")), Path(out) / "tokenizer")
    if not (Path(out) / "tokenizer" / "openvino_tokenizer.xml").is_file():
        raise RuntimeError("openvino-tokenizers did not convert the tokenizer (no tokenizer/openvino_tokenizer.xml)")
    return {"text_encoder_loading": {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs"},
            "versions": versions()}


# -- measure ----------------------------------------------------------------------------------------
class ReplayGenerator:
    """An ``openvino_genai.Generator`` serving pre-drawn tensors in order (see the module docstring)."""

    def __new__(cls, noise: np.ndarray):
        import openvino as ov
        import openvino_genai as ov_genai

        class _Replay(ov_genai.Generator):
            def __init__(self, draws):
                ov_genai.Generator.__init__(self)
                self.draws, self.used = draws, 0

            def next(self):
                raise RuntimeError("the peer asked for a scalar draw; the replayed noise has only tensors")

            def randn_tensor(self, shape):
                shape = tuple(int(s) for s in shape)
                if self.used >= len(self.draws) or tuple(self.draws[self.used].shape) != shape:
                    have = [tuple(d.shape) for d in self.draws]
                    raise RuntimeError(f"draw {self.used} of shape {shape} does not match the replayed noise {have}")
                t = ov.Tensor(np.ascontiguousarray(self.draws[self.used]))
                self.used += 1
                return t

        return _Replay(list(noise))


class Clock:
    """Per-stage durations of one call, by wrapping callables."""

    def __init__(self):
        self.stages: dict[str, list[float]] = {}

    def wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.stages.setdefault(stage, []).append(time.perf_counter() - t0)
            return out

        return timed

    def take(self) -> dict[str, list[float]]:
        out, self.stages = self.stages, {}
        return out


class OptimumPeer:
    """optimum-intel's ``OVLatentConsistencyModelPipeline`` (OVDiffusionPipeline picks it for an LCM
    folder), reshaped to the scenario's static size and compiled with the benchmark's threads."""

    @staticmethod
    def imports():
        import torch  # noqa: F401
        from optimum.intel import OVDiffusionPipeline  # noqa: F401

    def __init__(self, job: dict):
        from optimum.intel import OVDiffusionPipeline

        self.job = job
        self.pipe = OVDiffusionPipeline.from_pretrained(job["ir"], compile=False, ov_config=ov_config(job["threads"]))
        self.pipe.reshape(batch_size=1, height=job["height"], width=job["width"],
                          num_images_per_prompt=job["batch"])
        self.pipe.compile()
        self.clock = Clock()
        for stage, part in (("text_encoder", self.pipe.text_encoder), ("unet", self.pipe.unet),
                            ("vae_decoder", self.pipe.vae_decoder)):
            part.forward = self.clock.wrap(stage, part.forward)

    @property
    def pipeline(self) -> str:
        return type(self.pipe).__name__

    def __call__(self):
        import torch

        j = self.job
        out = self.pipe(j["prompt"], height=j["height"], width=j["width"], num_inference_steps=j["steps"],
                        num_images_per_prompt=j["batch"], guidance_scale=j["guidance"],
                        generator=torch.Generator("cpu").manual_seed(j["seed"]), output_type="np")
        return np.asarray(out.images, dtype=np.float32), self.clock.take()


class GenAIPeer:
    """OpenVINO GenAI's ``Text2ImagePipeline`` (C++), reshaped to the scenario's static size."""

    @staticmethod
    def imports():
        import openvino_genai  # noqa: F401

    def __init__(self, job: dict):
        import openvino_genai as ov_genai

        self.job = job
        self.noise = np.load(job["noise"])
        self.pipe = ov_genai.Text2ImagePipeline(job["ir"])
        self.pipe.reshape(job["batch"], job["height"], job["width"], job["guidance"])
        self.pipe.compile("CPU", config={**ov_config(job["threads"]), "CACHE_DIR": str(Path(job["ir"]) / "model_cache")})

    pipeline = "Text2ImagePipeline"

    def __call__(self):
        j = self.job
        t = self.pipe.generate(j["prompt"], width=j["width"], height=j["height"], num_inference_steps=j["steps"],
                               num_images_per_prompt=j["batch"], guidance_scale=j["guidance"],
                               generator=ReplayGenerator(self.noise))
        images = np.asarray(t.data, dtype=np.float32) / 255.0
        return images, self.stage_timings()

    def stage_timings(self) -> dict[str, list[float]]:
        """Per-stage durations of the last call from GenAI's own performance metrics: the UNet's raw
        durations are in microseconds, the text encoder's (per encoder) and the VAE's in milliseconds."""
        m = self.pipe.get_performance_metrics()
        return {"text_encoder": [sum(m.get_text_encoder_infer_duration().values()) / 1e3],
                "unet": [float(d) / 1e6 for d in m.raw_metrics.unet_inference_durations],
                "vae_decoder": [float(m.get_vae_decoder_infer_duration()) / 1e3]}


PEERS = {"optimum-intel": OptimumPeer, "openvino-genai": GenAIPeer}


def measure(job_dir: Path, bar) -> dict:
    job = json.loads((job_dir / "job.json").read_text())
    cls = PEERS[job["peer"]]
    cache = Path(job["ir"]) / "model_cache"
    cache_warm = cache.is_dir() and any(cache.iterdir())
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        cls.imports()
        import_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        peer = cls(job)
        load_s = time.perf_counter() - t0
        bar.note(f"{job['scenario']}: {job['peer']} loaded in {load_s:.1f}s")
        t0 = time.perf_counter()
        image, _ = peer()
        first_s = time.perf_counter() - t0
        bar.step(f"{job['scenario']}: {job['peer']} first image")
        e2e, timings = [], []
        if not job.get("load_only"):
            for _ in range(max(0, job["warmup"] - 1)):
                peer()
                bar.step(f"{job['scenario']}: {job['peer']} warm-up")
            for i in range(job["repeats"]):
                t0 = time.perf_counter()
                img, t = peer()
                e2e.append(time.perf_counter() - t0)
                timings.append(t)
                if i == 0:
                    image = img
                bar.step(f"{job['scenario']}: {job['peer']}")
    np.save(job_dir / "image.npy", image)
    return {"import_s": import_s, "load_s": load_s, "first_image_s": first_s, "model_cache_warm": cache_warm, "e2e": e2e,
            "timings": timings, "memory": mem.result(), "weight_bytes": ir_weight_bytes(job["ir"]),
            "pipeline": peer.pipeline, "compute_precision": default_precision(), "versions": versions(),
            "pid": os.getpid()}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 3 and argv[0] == "export":
        print(json.dumps(export(argv[1], argv[2])))
        return 0
    if len(argv) == 2 and argv[0] == "measure":
        job_dir = Path(argv[1])
        proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        sys.stdout.flush()
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # the protocol keeps stdout; the rest goes to stderr
        rec = measure(job_dir, PipeProgress(proto))
        write_json_atomic(job_dir / "result.json", rec)
        proto.close()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
