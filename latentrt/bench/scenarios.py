"""Benchmark scenarios: what to run (model, size, steps, batch, backend, precision, VAE) and how
(threads, warm-up, repeats, baselines), from a small TOML file or the command line.

TOML layout (see ``benchmarks/scenarios/*.toml``): a ``[defaults]`` table and one ``[[scenario]]``
table per scenario; a scenario's keys override the defaults, and command-line options override both.

``isolate = true`` measures each system of a scenario (latentrt, then each baseline) in a fresh child
process (:mod:`latentrt.bench.child`), so their memory never adds up and each record's peak RSS is its
own process's: needed where the two systems do not fit in memory together (full-size SDXL at
1024x1024: ~14 GB for the fp32 diffusers baseline, ~8 GB for latentrt). It makes the separate
``isolated_memory`` probe redundant, so that probe is skipped.

``task`` says which pipeline a scenario runs (:mod:`latentrt.bench.tasks`): "text-to-image" (the
default), "upscale" (the x2 latent upscaler; ``height`` x ``width`` is its output, the input image
half that), "unclip" (Stable unCLIP through the prior) or "unclip-variation" (unCLIP image
variations). ``vae_tiling = true`` decodes (and encodes) with latentrt's tiled VAE; the diffusers
baseline (and so the PSNR reference) stays untiled, so a tiled and an untiled row share it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VAES = ("full", "tiny")
#: diffusers (torch) and the OpenVINO peers of :mod:`latentrt.bench.peers` (each in its own venv)
BASELINES = ("diffusers", "optimum-intel", "openvino-genai")


@dataclass(frozen=True)
class Scenario:
    name: str = "default"
    #: a model name of :mod:`latentrt.bench.models` ("sd15-lcm", "tiny-lcm") or a bundle folder
    model: str = "sd15-lcm"
    height: int = 512
    width: int = 512
    steps: int = 4
    batch: int = 1
    guidance: float = 8.0
    backend: str = "onnxruntime"
    device: str = "cpu"
    precision: str = "fp32"
    vae: str = "full"
    threads: int | None = None  # None: the CPUs this process may use
    warmup: int = 1
    repeats: int = 5
    #: baselines run in the same process (unless ``isolate``) on the same weights ("diffusers"); [] for none
    baselines: tuple[str, ...] = ("diffusers",)
    #: the VAE the baseline uses ("full" compares TAESD runs against diffusers with its full VAE)
    baseline_vae: str | None = None
    #: baseline precision: None picks fp32 on CPU and fp16 (with SDPA) on CUDA
    baseline_precision: str | None = None
    cold_start: bool = True
    #: also measure peak RSS of the runtime alone, in a fresh process (load + one call)
    isolated_memory: bool = True
    #: measure each system (latentrt, each baseline) in its own fresh child process
    isolate: bool = False
    prompt: str = "a photograph of an astronaut riding a horse on the moon, highly detailed"
    seed: int = 0
    #: extra options for the engine backend (e.g. ONNX Runtime session settings of a fast path)
    engine_options: dict = field(default_factory=dict)
    #: mark the scenarios the issue's targets are checked on
    targets: bool = False
    #: images per system for the quality gate (:mod:`latentrt.bench.quality`; 0: no gate, >= 8 for issue 18)
    quality_samples: int = 0
    #: the gate's lowest acceptable PSNR against diffusers fp32
    quality_gate_db: float = 30.0
    #: the pipeline: "text-to-image", "upscale", "unclip" or "unclip-variation" (latentrt.bench.tasks)
    task: str = "text-to-image"
    #: latentrt decodes with its tiled VAE (vae_tiling=True); the baseline stays untiled
    vae_tiling: bool = False
    #: the diffusers baseline's untimed and timed calls (None: warmup / repeats): a slow fp32 baseline may
    #: be measured once (baseline_warmup = 0, baseline_repeats = 1, flops = false) while latentrt repeats
    baseline_warmup: int | None = None
    baseline_repeats: int | None = None
    #: the baseline's first call counts FLOPs per stage (torch's FlopCounterMode; an extra call without warm-up)
    flops: bool = True

    def __post_init__(self):
        for k in ("height", "width", "steps", "batch", "repeats"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"scenario {self.name!r}: {k} must be a positive integer; got {v!r}")
        if not isinstance(self.quality_samples, int) or isinstance(self.quality_samples, bool) or self.quality_samples < 0:
            raise ValueError(f"scenario {self.name!r}: quality_samples must be an integer >= 0; got {self.quality_samples!r}")
        if self.quality_samples and "diffusers" not in self.baselines:
            raise ValueError(f"scenario {self.name!r}: quality_samples compares with diffusers fp32; add \"diffusers\" "
                             "to baselines")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"scenario {self.name!r}: warmup must be an integer >= 0; got {self.warmup!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"scenario {self.name!r}: threads must be a positive integer; got {self.threads!r}")
        for k in ("vae", "baseline_vae"):
            v = getattr(self, k)
            if v is not None and v not in VAES:
                raise ValueError(f"scenario {self.name!r}: {k} must be one of {VAES}; got {v!r}")
        if not isinstance(self.isolate, bool):
            raise ValueError(f"scenario {self.name!r}: isolate must be true or false; got {self.isolate!r}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ValueError(f"scenario {self.name!r}: unknown baselines {bad}; known: {list(BASELINES)}")
        for k in ("baseline_warmup", "baseline_repeats"):
            v, least = getattr(self, k), 0 if k == "baseline_warmup" else 1
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < least):
                raise ValueError(f"scenario {self.name!r}: {k} must be an integer >= {least} (or absent: "
                                 f"{k.split('_')[1]}); got {v!r}")
        if not isinstance(self.flops, bool):
            raise ValueError(f"scenario {self.name!r}: flops must be true or false; got {self.flops!r}")
        self._check_task()

    def _check_task(self) -> None:
        from .tasks import TASKS, TEXT_TO_IMAGE

        if self.task not in TASKS:
            raise ValueError(f"scenario {self.name!r}: unknown task {self.task!r}; known: {sorted(TASKS)}")
        if not isinstance(self.vae_tiling, bool):
            raise ValueError(f"scenario {self.name!r}: vae_tiling must be true or false; got {self.vae_tiling!r}")
        if self.vae_tiling and self.vae != "full":
            raise ValueError(f"scenario {self.name!r}: vae_tiling tiles the full VAE, not TAESD; set vae = \"full\"")
        if self.task == TEXT_TO_IMAGE:
            return
        if self.vae != "full" or (self.baseline_vae or "full") != "full":
            raise ValueError(f"scenario {self.name!r}: task {self.task!r} runs the full VAE only (its bundles carry "
                             "no TAESD); set vae = \"full\"")
        if self.quality_samples:
            raise ValueError(f"scenario {self.name!r}: the quality gate (quality_samples) runs text-to-image prompts; "
                             f"set quality_samples = 0 for task {self.task!r}")
        extra = [b for b in self.baselines if b != "diffusers"]
        if extra:
            raise ValueError(f"scenario {self.name!r}: the OpenVINO peers {extra} run text-to-image only; "
                             f"task {self.task!r} takes baselines = [\"diffusers\"] or []")
        if not TASKS[self.task].sized and self.batch != 1:
            raise ValueError(f"scenario {self.name!r}: task {self.task!r} makes one image per input image; set batch = 1")

    @property
    def resolved_threads(self) -> int:
        from ..runtime.engines.onnxruntime import default_threads

        return self.threads or default_threads()

    @property
    def resolved_baseline_warmup(self) -> int:
        return self.warmup if self.baseline_warmup is None else self.baseline_warmup

    @property
    def resolved_baseline_repeats(self) -> int:
        return self.repeats if self.baseline_repeats is None else self.baseline_repeats

    @property
    def resolved_baseline_vae(self) -> str:
        return self.baseline_vae or self.vae

    @property
    def resolved_baseline_precision(self) -> str:
        return self.baseline_precision or ("fp16" if self.device.startswith("cuda") or self.device == "tensorrt" else "fp32")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["baselines"] = list(self.baselines)
        return d


FIELDS = {f.name for f in dataclasses.fields(Scenario)}


def make_scenario(values: dict[str, Any], where: str = "scenario") -> Scenario:
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys: {sorted(FIELDS)}")
    v = dict(values)
    if "baselines" in v:
        b = v["baselines"]
        v["baselines"] = (b,) if isinstance(b, str) else tuple(b or ())
    return Scenario(**v)


def load_scenarios(path: str | Path, overrides: dict[str, Any] | None = None,
                   only: list[str] | None = None) -> list[Scenario]:
    """Scenarios of a TOML file; ``overrides`` (command-line values) apply to each; ``only`` keeps
    the named scenarios."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such scenario file (see benchmarks/scenarios/*.toml)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    unknown = sorted(set(data) - {"defaults", "scenario", "description"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {unknown}; use [defaults] and [[scenario]] tables")
    defaults = data.get("defaults", {})
    tables = data.get("scenario", [])
    if not tables:
        raise ValueError(f"{path}: no [[scenario]] tables")
    out = []
    for i, t in enumerate(tables):
        name = t.get("name", f"scenario-{i}")
        out.append(make_scenario({**defaults, **t, "name": name, **(overrides or {})}, f"{path} [[scenario]] {name!r}"))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: scenario names must be unique; got {names}")
    if only:
        missing = [n for n in only if n not in names]
        if missing:
            raise ValueError(f"{path}: no scenarios named {missing}; it has {names}")
        out = [s for s in out if s.name in only]
    return out
