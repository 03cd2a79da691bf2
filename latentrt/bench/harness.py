"""The benchmark harness: for each scenario, latentrt and its baselines in one process on the same
weights, with warm-up, repeats, per-stage timings, cold start, peak memory and image quality.

Per scenario and system, one JSON line (see :func:`result_record`); the first line of a run
describes the environment. Order per scenario: latentrt first (cold start with an empty engine cache,
then a second load, then the timed calls), then the baseline (whose first call also counts FLOPs per
stage with torch's FlopCounterMode, outside the timed repeats). Host memory peaks are per phase.

What each call does is the scenario's ``task`` (:mod:`.tasks`: text-to-image, the x2 upscaler, unCLIP
text-to-image or variation): latentrt and the baseline get the same keyword arguments and input image.

With a scenario's ``isolate`` on, each system is measured by the same code in a fresh child process
(:mod:`.child`): the parent only emits the child's record, keeps the images for PSNR and steps the
progress bar. Such records carry ``process`` ({"isolated": true, "pid", "parent_pid", "wall_s"}: the
child that measured it) and ``memory.own_process`` (true: the peaks are that process's alone; for
latentrt the ``isolated_memory`` probe is skipped, ``memory.isolated_probe`` says so). Before such a latentrt
measurement a fresh process loads the bundle and makes one call (``memory.primed``: that process's peak RSS, load
and first-image times), so one-time work that fills the bundle's caches (an int8 calibration: minutes and several
times a run's memory) never lands in the measured process's peak or load.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

from . import SCHEMA
from .env import bundle_hash, capture
from .memory import PeakMemory
from .quality import gate_calls, gate_result, split_gate, with_gate
from .scenarios import Scenario
from .stats import percentile, psnr, summarize
from .tasks import check_bundle, pipe_kwargs


def group_key(sc: Scenario, vae: str) -> str:
    """What makes two measurements comparable: same model, size, steps, batch and VAE."""
    return f"{sc.model}|{sc.height}x{sc.width}|{sc.steps}|{sc.batch}|{vae}"


def stage_summary(per_call_timings: list[dict[str, list[float]]]) -> dict:
    """Per stage: per-call durations, per-image totals and calls per image, over the repeats."""
    names = list(dict.fromkeys(k for t in per_call_timings for k in t))
    out = {}
    for name in names:
        calls = [x for t in per_call_timings for x in t.get(name, [])]
        totals = [sum(t.get(name, [])) for t in per_call_timings]
        out[name] = {"per_call": summarize(calls), "total": summarize(totals),
                     "calls": len(calls) // max(1, len(per_call_timings))}
    return out


def result_record(*, run_id: str, sc: Scenario, system: str, vae: str, precision: str, e2e: list[float],
                  timings: list[dict[str, list[float]]], extra: dict) -> dict:
    engine = [sum(sum(v) for v in t.values()) for t in timings]
    overhead = [max(0.0, a - b) for a, b in zip(e2e, engine)]
    rec = {
        "type": "result",
        "schema": SCHEMA,
        "run_id": run_id,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "scenario": sc.name,
        "settings": sc.to_dict(),
        "system": system,
        "group": group_key(sc, vae),
        "vae": vae,
        "precision": precision,
        "backend": sc.backend if system == "latentrt" else "torch",
        "device": sc.device,
        "threads": sc.resolved_threads,
        "images_per_call": sc.batch,
        "e2e": summarize(e2e),
        "e2e_samples": list(e2e),
        "stages": stage_summary(timings),
        "engine_total": summarize(engine),
        "overhead": {**summarize(overhead), "fraction_median": percentile(overhead, 50) / max(1e-12, percentile(e2e, 50))},
    }
    rec.update(extra)
    return rec


@contextmanager
def _fresh_engine_cache():
    """Point the runtime's engine/verification cache at an empty folder (a first load), restored after."""
    old = os.environ.get("LATENTRT_CACHE")
    tmp = tempfile.mkdtemp(prefix="latentrt-bench-cache-")
    os.environ["LATENTRT_CACHE"] = tmp
    try:
        yield tmp
    finally:
        if old is None:
            os.environ.pop("LATENTRT_CACHE", None)
        else:
            os.environ["LATENTRT_CACHE"] = old
        shutil.rmtree(tmp, ignore_errors=True)


class Progress:
    """A tqdm bar over every timed or warm-up call of the run (stderr); silent when disabled."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            import sys

            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="call", file=sys.stderr, dynamic_ncols=True)

    def step(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.set_description(desc[:60])
            self.bar.update(1)

    def note(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.set_description(desc[:60])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def baseline_calls(sc: Scenario, name: str) -> int:
    """The calls baseline ``name`` makes for scenario ``sc`` (progress steps)."""
    from .peers import PEERS

    if name in PEERS:  # warm-up, repeats, a first call without warm-up, and a cold start in one more process
        return sc.warmup + sc.repeats + (1 if sc.warmup == 0 else 0) + (1 if sc.cold_start else 0)
    warmup = sc.resolved_baseline_warmup
    return warmup + sc.resolved_baseline_repeats + (1 if sc.flops and warmup == 0 else 0)


def planned_calls(sc: Scenario) -> int:
    ours = sc.warmup + sc.repeats + (1 if sc.cold_start else 0)
    return ours + sum(baseline_calls(sc, b) for b in sc.baselines)


def noise_factory(sc: Scenario):
    """Fresh noise for each call from the scenario's seed: diffusers' own noise (torch.Generator)
    when a baseline runs, so the images can be compared; plain numpy otherwise (no torch needed)."""
    if sc.baselines:
        from latentrt.runtime.random import TorchGeneratorNoise

        return lambda: TorchGeneratorNoise(sc.seed)
    return lambda: sc.seed


def resolve_bundle(sc: Scenario, cache_dir: Path | None, log: Callable[[str], None]) -> Path:
    p = Path(sc.model)
    if (p / "latentrt.json").is_file():
        return p
    from .models import ensure_bundle

    return ensure_bundle(sc.model, sc.precision, cache_dir, progress=log)


def own_process(sc: Scenario, latentrt: bool = True) -> dict:
    """The memory fields of a system measured in its own process (``isolate``); {} otherwise."""
    if not sc.isolate:
        return {}
    out = {"own_process": True}
    if latentrt and sc.isolated_memory:
        out["isolated_probe"] = "skipped: with isolate the peaks above are already this process's alone"
    return out


class Runner:
    def __init__(self, *, out_path: Path | None, cache_dir: Path | None = None, progress: bool = True,
                 gemm: bool = True, log: Callable[[str], None] = print):
        self.out_path = Path(out_path) if out_path else None
        self.cache_dir = cache_dir
        self.progress_enabled = progress
        self.gemm = gemm
        self.log = log
        self.run_id = uuid.uuid4().hex[:12]
        self.records: list[dict] = []
        self.references: dict[str, object] = {}  # group -> fp32 baseline image (PSNR reference)
        self.baseline_done: dict[tuple, dict] = {}
        self.peer_images: dict[tuple[str, str], object] = {}  # (scenario, peer) -> first image (PSNR)
        self.baseline_images: dict[tuple, object] = {}  # baseline key -> a peer's first image (reuse)
        self.gate_references: dict[tuple, object] = {}  # (group, quality_samples) -> diffusers' gate images

    def emit(self, rec: dict) -> None:
        self.records.append(rec)
        if self.out_path is not None:
            self.out_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.out_path, "a") as f:
                f.write(json.dumps(rec, sort_keys=False) + "\n")

    def run(self, scenarios: Iterable[Scenario]) -> list[dict]:
        scenarios = list(scenarios)
        if not scenarios:
            raise ValueError("no scenarios to run")
        threads = scenarios[0].resolved_threads
        env = capture(threads, gemm=self.gemm)
        bar = Progress(sum(planned_calls(s) for s in scenarios), self.progress_enabled)
        try:
            # every bundle first (built on first use), each checked against its scenario's task, so a
            # scenario that cannot run stops the run before anything is written
            bundles = [resolve_bundle(sc, self.cache_dir, bar.note if bar.bar else self.log) for sc in scenarios]
            for sc, bundle in zip(scenarios, bundles):
                check_bundle(sc, bundle)
            self.emit({"type": "env", "schema": SCHEMA, "run_id": self.run_id,
                       "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **env})
            for sc, bundle in zip(scenarios, bundles):
                image, gate = self.run_latentrt(sc, bundle, bar)
                for name in sc.baselines:
                    self.run_baseline(sc, bundle, bar, name)
                self.add_quality(sc, image, gate)
        finally:
            bar.close()
        return self.records

    # -- latentrt ---------------------------------------------------------------------------------
    def call_kwargs(self, sc: Scenario) -> dict:
        """latentrt's call for the scenario's task (:mod:`.tasks`), its input image included."""
        from .tasks import latentrt_kwargs

        return latentrt_kwargs(sc)

    def run_latentrt(self, sc: Scenario, bundle: Path, bar: Progress):
        """Measure latentrt (here, or in a child process with ``isolate``), emit its record; its first image."""
        if sc.isolate:
            from .child import run_in_child

            rec, image = run_in_child(self, sc, bundle, bar, "latentrt")
        else:
            rec, image = self.measure_latentrt(sc, bundle, bar)
        image, gate = split_gate(image, rec.pop("gate_images", 0))
        self.emit(rec)
        return image, gate

    def measure_latentrt(self, sc: Scenario, bundle: Path, bar: Progress) -> tuple[dict, object]:
        """latentrt's result record and first image, measured in this process."""
        import latentrt

        noise = noise_factory(sc)
        opts = {"threads": sc.resolved_threads, **sc.engine_options}
        kw = self.call_kwargs(sc)
        cold = {}
        gc.collect()
        if sc.cold_start:
            with _fresh_engine_cache():
                t0 = time.perf_counter()
                pipe = latentrt.load(bundle, backend=sc.backend, device=sc.device, **opts)
                t1 = time.perf_counter()
                pipe(sc.prompt, generator=noise(), **kw)
                t2 = time.perf_counter()
                bar.step(f"{sc.name}: latentrt cold start")
                del pipe
                gc.collect()
                t3 = time.perf_counter()
                second = latentrt.load(bundle, backend=sc.backend, device=sc.device, **opts)
                t4 = time.perf_counter()
                del second
                gc.collect()
            cold = {"load_first_s": t1 - t0, "first_image_s": t2 - t1, "cold_start_s": t2 - t0,
                    "load_second_s": t4 - t3, "load_speedup": (t1 - t0) / max(1e-9, t4 - t3),
                    "note": "first load with an empty engine cache (LATENTRT_CACHE); OS file cache warm"}
        primed = None
        if sc.isolate:
            # this process's peak is the record's own (no memory probe follows): let a fresh process fill the
            # bundle's caches first (int8 calibration, converted IRs, compiled blobs), so that one-time work,
            # which holds far more memory than a run, is neither in the peak nor in the load time
            from .memprobe import run_probe

            bar.note(f"{sc.name}: latentrt priming the bundle's caches in a fresh process")
            primed = run_probe(bundle, sc)
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            pipe = latentrt.load(bundle, backend=sc.backend, device=sc.device, **opts)
            load_s = time.perf_counter() - t0
            for i in range(sc.warmup):
                pipe(sc.prompt, generator=noise(), **kw)
                bar.step(f"{sc.name}: latentrt warm-up")
            e2e, timings, image = [], [], None
            for i in range(sc.repeats):
                t0 = time.perf_counter()
                out = pipe(sc.prompt, generator=noise(), **kw)
                e2e.append(time.perf_counter() - t0)
                timings.append(out.timings)
                if image is None:
                    image = out.images
                bar.step(f"{sc.name}: latentrt")
        gate = []
        if sc.quality_samples:
            from latentrt.runtime.random import TorchGeneratorNoise

            for prompt, seed in gate_calls(sc):
                gate.append(pipe(prompt, generator=TorchGeneratorNoise(seed), **dict(kw, num_images_per_prompt=1)).images)
                bar.note(f"{sc.name}: latentrt quality gate {len(gate)}/{sc.quality_samples}")
        image, gate_count = with_gate(image, gate)
        m = pipe.bundle.manifest
        weight_bytes = sum(sum(m.components[c].sizes.values()) for c in pipe.engines if c in m.components)
        cold.setdefault("load_s", load_s)
        components = sorted(pipe.engines)
        # what each engine computes in (a backend may run an fp32 bundle in bf16): the floor depends on it
        compute = {c: str(getattr(e, "compute_precision", None) or getattr(e, "precision", None) or m.components[c].precision)
                   for c, e in pipe.engines.items()}
        del pipe
        gc.collect()
        isolated = None
        if (sc.isolated_memory and not sc.isolate) or sc.cold_start:
            from .memprobe import run_probe

            bar.note(f"{sc.name}: latentrt in a fresh process (peak RSS, load and first image)")
            probe = run_probe(bundle, sc)
            if sc.isolated_memory and not sc.isolate:
                isolated = probe
            if sc.cold_start and "load_s" in probe:  # the bundle's caches are filled by now
                cold["new_process"] = {"load_s": probe["load_s"], "first_image_s": probe["first_image_s"],
                                       "note": "a new process loading the already-used bundle (engine caches "
                                               "filled, OS file cache warm): load, then its first image"}
        extra = {
            "gate_images": gate_count,
            "compute_precision": compute,
            "cold_start": cold,
            "memory": {**mem.result(), "weight_bytes": weight_bytes, "components_loaded": components,
                       **({"isolated": isolated} if isolated is not None else {}),
                       **({"primed": primed} if primed is not None else {}), **own_process(sc)},
            "bundle": {"path": str(bundle), "hash": bundle_hash(bundle), "precision": m.precision,
                       "component_precision": {c: m.components[c].precision for c in components}},
        }
        rec = result_record(run_id=self.run_id, sc=sc, system="latentrt", vae=sc.vae, precision=sc.precision,
                            e2e=e2e, timings=timings, extra=extra)
        return rec, image

    # -- baselines --------------------------------------------------------------------------------
    def run_baseline(self, sc: Scenario, bundle: Path, bar: Progress, name: str) -> None:
        """Measure baseline ``name`` (here, or in a child process with ``isolate``) and emit its record,
        or reuse the record of the same baseline measured for an earlier scenario."""
        vae, prec = sc.resolved_baseline_vae, sc.resolved_baseline_precision
        key = (name, group_key(sc, vae), prec, sc.device, sc.resolved_threads, sc.resolved_baseline_warmup,
               sc.resolved_baseline_repeats, sc.flops, sc.quality_samples if name == "diffusers" else 0)
        if sc.isolate:  # a baseline measured in a shared process is no stand-in for an isolated one
            key += ("isolated",)
        if key in self.baseline_done:  # the same baseline measured for an earlier scenario: reuse it
            rec = dict(self.baseline_done[key], scenario=sc.name, settings=sc.to_dict(), reused=True)
            if key in self.baseline_images:
                self.peer_images[(sc.name, name)] = self.baseline_images[key]
            self.emit(rec)
            for _ in range(baseline_calls(sc, name)):
                bar.step(f"{sc.name}: {name} (reused)")
            return
        from .peers import PEERS, measure_peer

        if name in PEERS:  # always in its own venv and process
            rec, image = measure_peer(self, sc, bundle, bar, name)
            self.peer_images[(sc.name, name)] = self.baseline_images[key] = image
        elif sc.isolate:
            from .child import run_in_child

            rec, image = run_in_child(self, sc, bundle, bar, name)
        else:
            rec, image = self.measure_baseline(sc, bundle, bar, name)
        if name == "diffusers":
            image, gate = split_gate(image, rec.pop("gate_images", 0))
            if prec == "fp32":
                self.references[group_key(sc, vae)] = image
                self.gate_references[(group_key(sc, vae), sc.quality_samples)] = gate
        self.baseline_done[key] = rec
        self.emit(rec)

    def measure_baseline(self, sc: Scenario, bundle: Path, bar: Progress, name: str) -> tuple[dict, object]:
        """Baseline ``name``'s result record and first image, measured in this process."""
        from .baseline import DiffusersBaseline
        from .models import model_folder_of, taesd_folder_of

        vae, prec = sc.resolved_baseline_vae, sc.resolved_baseline_precision
        folder = model_folder_of(bundle)
        if folder is None:
            raise ValueError(f"{bundle}: the diffusers folder it was exported from is gone, so the baseline cannot "
                             "run on the same weights; re-export or pass baselines = [] (--no-baseline)")
        gc.collect()
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            base = DiffusersBaseline(folder, vae=vae, taesd=taesd_folder_of(bundle), device=sc.device,
                                     precision=prec, threads=sc.resolved_threads)
            load_s = time.perf_counter() - t0
            call = dict(prompt=sc.prompt, seed=sc.seed, **pipe_kwargs(sc))  # the task's call, as latentrt's
            # the first warm-up call counts FLOPs per stage (with ``flops``: an extra call when there is no
            # warm-up); with neither, the first call is the first timed one
            warmup, first_s = sc.resolved_baseline_warmup, None
            if sc.flops or warmup:
                t0 = time.perf_counter()
                base(**call, count_flops=sc.flops)
                first_s = time.perf_counter() - t0
                bar.step(f"{sc.name}: {name} warm-up" + (" (FLOPs)" if sc.flops else ""))
            for _ in range(max(0, warmup - 1)):
                base(**call)
                bar.step(f"{sc.name}: {name} warm-up")
            e2e, timings, image = [], [], None
            for _ in range(sc.resolved_baseline_repeats):
                t0 = time.perf_counter()
                img, t = base(**call)
                e2e.append(time.perf_counter() - t0)
                timings.append(t)
                if image is None:
                    image = img
                bar.step(f"{sc.name}: {name}")
            gate = []
            for prompt, seed in gate_calls(sc):
                gate.append(base(**dict(call, prompt=prompt, seed=seed, num_images_per_prompt=1))[0])
                bar.note(f"{sc.name}: {name} quality gate {len(gate)}/{sc.quality_samples}")
        image, gate_count = with_gate(image, gate)
        flops = base.flops()
        extra = {
            "cold_start": {"load_s": load_s, "first_image_s": first_s if first_s is not None else e2e[0],
                           "note": "first image counted FLOPs (FlopCounterMode), so it is slower than a plain call"
                                   if sc.flops else "first image: the first timed call (no warm-up)"},
            "memory": {**mem.result(), "weight_bytes": base.weight_bytes, **own_process(sc, latentrt=False)},
            "flops": flops,
            "gate_images": gate_count,
            "baseline": {"library": "diffusers", "pipeline": type(base.pipe).__name__, "dtype": prec,
                         "attention": "SDPA" if base.device == "cuda" else "default (torch CPU)"},
            "bundle": {"path": str(bundle), "hash": bundle_hash(bundle)},
        }
        base.close()
        del base
        gc.collect()
        rec = result_record(run_id=self.run_id, sc=sc, system=name, vae=vae, precision=prec, e2e=e2e,
                            timings=timings, extra=extra)
        return rec, image

    def add_quality(self, sc: Scenario, image, gate=None) -> None:
        """PSNR of latentrt's image against the fp32 diffusers image of the same VAE and noise, and of
        each peer's (full VAE) image: a peer far from it did not run the same weights."""
        from .peers import SAME_WEIGHTS_DB

        images = {"latentrt": (image, sc.vae)}
        images.update({peer: (img, "full") for (scn, peer), img in self.peer_images.items() if scn == sc.name})
        for system, (img, vae) in images.items():
            ref = self.references.get(group_key(sc, vae))
            if ref is None or img is None:
                continue
            value = psnr(img, ref)
            quality = {"psnr_db": value, "reference": "diffusers fp32, same weights, VAE and noise"}
            if system != "latentrt":
                quality["same_weights"] = value >= SAME_WEIGHTS_DB
                if not quality["same_weights"]:
                    self.log(f"warning: {system}'s image is {value:.1f} dB from diffusers' on the same weights and "
                             f"noise (< {SAME_WEIGHTS_DB:g} dB): it did not run the same model; its times are no "
                             "comparison")
            ref_gate = self.gate_references.get((group_key(sc, vae), sc.quality_samples))
            if system == "latentrt" and gate is not None and len(gate) and ref_gate is not None:
                quality["gate"] = gate_result(gate, ref_gate, sc.quality_gate_db)
                if not quality["gate"]["passed"]:
                    self.log(f"quality gate of {sc.name}: {quality['gate']['verdict']} "
                             f"(lowest {quality['gate']['psnr_min_db']:.1f} dB over {len(gate)} images)")
            for rec in reversed(self.records):
                if rec.get("system") == system and rec.get("scenario") == sc.name:
                    rec["quality"] = quality
                    break
        if self.out_path is not None:  # rewrite the file with the quality added (lines are small)
            self._rewrite()

    def _rewrite(self) -> None:
        lines = self.out_path.read_text().splitlines() if self.out_path.is_file() else []
        keep = [ln for ln in lines if json.loads(ln).get("run_id") != self.run_id]
        tmp = self.out_path.with_suffix(self.out_path.suffix + ".tmp")
        tmp.write_text("".join(l + "\n" for l in keep) + "".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(tmp, self.out_path)


def run_benchmarks(scenarios, *, out_path=None, cache_dir=None, progress=True, gemm=True, log=print) -> list[dict]:
    return Runner(out_path=out_path, cache_dir=cache_dir, progress=progress, gemm=gemm, log=log).run(scenarios)
