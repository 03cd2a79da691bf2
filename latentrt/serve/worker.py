"""The batching worker: one per loaded pipeline, one thread, no web framework.

Requests (:class:`Job`) wait in a bounded queue. The worker takes the oldest and, for up to
``batch_wait_ms``, gathers the queued jobs whose batch-compatible arguments agree with it (same
:meth:`Worker.batch_key`: size, steps, scheduler, strength, input-image size, and guidance unless the
pipeline takes it per image as LCM does) into one pipeline call of at most ``max_batch`` images.

Each job still gets exactly the images it would get alone: the call gets one prompt per image and a
:class:`GroupNoise` that hands every job's rows to that job's own seeded generator, so every draw
(initial noise, VAE sample, per-step noise) comes from the same generator in the same order and
shape as ``pipe(prompt, num_images_per_prompt=n, generator=seed)``. Image-to-image inputs are encoded
per job beforehand (``pipe.encode_image`` with the job's generator, as the call would) and passed on
as latents.

Between denoising steps (the pipelines' ``callback_on_step_end``) the worker checks each job for a
cancellation (client gone, deadline past, interrupt). A cancelled job is answered at once and the batch
stops there; its batch-mates go back to the front of the queue and run again from their seeds (the
same images), so the cancelled work stops within one step and nobody else's result changes.

Used by :mod:`latentrt.serve.app` (FastAPI) and meant to be wrapped as is by other front ends (a Ray
Serve deployment): it knows nothing of HTTP.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..runtime.pipelines.guidance import check_strength
from ..runtime.pipelines.ip_adapter import ip_adapter_request
from .call_options import IP_PARAMS, OPTION_PARAMS
from .errors import Cancelled, DeadlineExceeded, Draining, Interrupted, QueueFull, ServeError

logger = logging.getLogger("latentrt.serve")

#: pipeline kinds whose calls take a list of prompts and a per-image generator (batchable)
BATCHABLE = ("lcm", "sd", "sdxl")
#: call arguments shared by a batch (the rest, prompt / negative prompt / seed / image, are per job)
SHARED = ("height", "width", "num_inference_steps", "guidance_scale", "scheduler", "strength", "vae",
          *OPTION_PARAMS, *IP_PARAMS)
MAX_IMAGES_PER_REQUEST = 10
_seeds = np.random.default_rng()


class GroupNoise:
    """Noise for a batch made of several jobs: rows ``[start, start + n)`` of every draw come from
    that job's own generator, drawn as a call of the job alone would draw them."""

    def __init__(self, groups: Sequence[tuple[Any, int]]):
        self.groups = list(groups)
        self.batch = sum(n for _, n in self.groups)

    def standard_normal(self, size, dtype=np.float32) -> np.ndarray:
        size = tuple(size)
        if size[0] != self.batch:
            raise ValueError(f"a draw of {size[0]} rows does not split into this batch's {self.batch} images")
        return np.concatenate([g.standard_normal((n,) + size[1:], dtype=dtype) for g, n in self.groups], axis=0)


@dataclass
class Result:
    images: list  # PIL images, the job's own
    seed: int
    timings: dict[str, list[float]]
    batch_images: int  # images in the pipeline call that made them
    nsfw_content_detected: list | None = None  # per image, when the safety checker ran (runtime/safety.py)


@dataclass(eq=False)
class Job:
    """One request: ``n`` images of ``prompt``. ``params`` are the shared call arguments (see
    :data:`SHARED`); ``on_step(step, steps, latents)`` sees this job's latents after every step."""

    prompt: str
    n: int = 1
    seed: int | None = None
    negative_prompt: str | None = None
    image: Any = None
    params: dict = field(default_factory=dict)
    timeout_s: float | None = None
    on_step: Callable[[int, int, np.ndarray], None] | None = None
    future: Future = field(default_factory=Future)

    def __post_init__(self):
        if self.seed is None:  # drawn here so a re-run (after a batch-mate's cancel) gives the same images
            self.seed = int(_seeds.integers(0, 2**31 - 1))
        self.created = time.monotonic()
        self.deadline = self.created + self.timeout_s if self.timeout_s else None
        self._cancel: ServeError | None = None
        self.cancelled_at: tuple[float, int] | None = None  # (time, steps done) when cancel() was called
        self.step = 0

    def cancel(self, error: ServeError | None = None) -> None:
        """Ask the worker to drop this job (between steps if it is running)."""
        if self._cancel is None:
            self._cancel = error or Cancelled("the client closed the connection")
            self.cancelled_at = (time.monotonic(), self.step)

    def stop_reason(self, now: float) -> ServeError | None:
        if self._cancel is not None:
            return self._cancel
        if self.deadline is not None and now > self.deadline:
            return DeadlineExceeded(f"the request ran past its {self.timeout_s:g} s deadline (--timeout-s)")
        return None

    @property
    def done(self) -> bool:
        return self.future.done()

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def finish(self, result: Result) -> None:
        if not self.future.done():
            self.future.set_result(result)


class Observer:
    """What the worker reports (metrics); every hook is optional. See :mod:`latentrt.serve.metrics`."""

    def queue_depth(self, model: str, depth: int) -> None: ...

    def batch(self, model: str, images: int, seconds: float, timings: dict[str, list[float]]) -> None: ...

    def cancelled(self, model: str, steps_after: int, seconds: float) -> None: ...


class _BatchStopped(Exception):
    def __init__(self, survivors: list[Job]):
        self.survivors = survivors


class Worker:
    """The queue and the thread that serves one pipeline."""

    def __init__(self, name: str, pipe, *, max_batch: int = 4, batch_wait_ms: float = 20.0, max_queue: int = 32,
                 timeout_s: float | None = None, observer: Observer | None = None, safety_checker: bool | None = None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1; got {max_batch}, {max_queue}")
        self.name, self.pipe = name, pipe
        #: every call's safety_checker (None: the bundle's checker when it has one; see serve --safety-checker)
        self.safety_checker = safety_checker
        self.kind = pipe.bundle.manifest.pipeline
        self.max_batch = int(max_batch) if self.kind in BATCHABLE else 1
        self.batch_wait_s = max(0.0, batch_wait_ms) / 1000.0
        self.max_queue, self.timeout_s = int(max_queue), timeout_s
        self.observer = observer or Observer()
        self.per_image_guidance = bool(getattr(pipe, "per_image_guidance", False))
        sig = inspect.signature(pipe.__call__).parameters
        self.accepts = set(sig)
        if self.kind in BATCHABLE and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values()):
            self.accepts |= set(IP_PARAMS)  # taken through the conditioning **kwargs
        if safety_checker and "safety_checker" not in self.accepts:
            raise ValueError(f"{name}: --safety-checker on, but a {self.kind} pipeline runs no safety checker; serve "
                             "it with --safety-checker off (or the default)")
        if safety_checker is not None and "safety_checker" in self.accepts:
            from ..runtime.safety import check_request

            check_request(pipe, safety_checker)  # "on" for a bundle without a checker: refused at start
        #: the pipeline's defaults for the shared arguments it takes (what a request that omits them gets)
        self.defaults = {k: sig[k].default for k in SHARED if k in sig and sig[k].default is not inspect.Parameter.empty}
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._running: list[Job] = []
        self._closing = self._stopped = False
        self._batch_seconds = 0.0  # moving average of a batch's wall time (Retry-After)
        self.progress = {"step": 0, "steps": 0, "started": None, "latents": None}
        self._thread = threading.Thread(target=self._loop, name=f"latentrt-worker-{name}", daemon=True)

    # -- the outside -------------------------------------------------------------------------------
    def start(self) -> "Worker":
        self._thread.start()
        return self

    def died(self) -> bool:
        """True when the worker thread was started and has ended without :meth:`stop` (a crash): a
        health check replaces such a server (or replica)."""
        return self._thread.ident is not None and not self._thread.is_alive() and not self._stopped

    def warm_up(self) -> None:
        """One short call (engines allocate and optimise on their first run); a failure is logged,
        and the requests that hit the same problem get its error."""
        kwargs = {"num_inference_steps": 1} if "num_inference_steps" in self.accepts else {}
        if self.safety_checker is not None and "safety_checker" in self.accepts:
            kwargs["safety_checker"] = self.safety_checker
        if self.kind == "latent_upscale":  # takes an image: SD latents of a small one
            f = self.pipe.vae_scale_factor
            kwargs["image"] = np.zeros((1, int(self.pipe.constants["latent_channels"]), 64 // f, 64 // f), np.float32)
        elif self.kind == "unclip_img2img":
            from PIL import Image

            kwargs["image"] = Image.new("RGB", (64, 64), (128, 128, 128))
        try:
            self.pipe.load_deferred()  # the VAE encoder too: a first image-to-image request should not wait for it
            self.pipe("warm-up", generator=0, output_type="np", **kwargs)
        except Exception:
            logger.exception("%s: the warm-up call failed", self.name)

    def check(self, job: Job) -> None:
        """The runtime's own checks of a job's arguments, before it queues (ValueError: a 400)."""
        if not isinstance(job.prompt, str):
            raise TypeError(f"prompt must be a string; got {type(job.prompt).__name__}")
        if isinstance(job.n, bool) or not isinstance(job.n, int) or not 1 <= job.n <= MAX_IMAGES_PER_REQUEST:
            raise ValueError(f"n (images per request) must be an integer in [1, {MAX_IMAGES_PER_REQUEST}]; got {job.n!r}")
        if isinstance(job.seed, bool) or not isinstance(job.seed, int):
            raise TypeError(f"seed must be an integer; got {job.seed!r}")
        if job.seed < 0:
            raise ValueError(f"seed must be >= 0; got {job.seed} (leave it out for a random one)")
        unknown = set(job.params) - set(SHARED)
        if unknown:
            raise ValueError(f"unknown arguments {sorted(unknown)}")
        p = {**self.defaults, **job.params}
        if job.image is None and ("height" in self.accepts):
            self.pipe.default_size(p.get("height"), p.get("width"))
        if job.image is not None and "strength" in self.accepts:
            check_strength(p.get("strength"))
            if p.get("vae") != "tiny" and not self.pipe.bundle.has("vae_encoder"):
                raise ValueError(f"{self.name}: image-to-image needs a vae_encoder, which this bundle lacks")
        sched = self.pipe.get_scheduler(p.get("scheduler"))
        if "num_inference_steps" in p:
            steps = p["num_inference_steps"]
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"num_inference_steps must be a positive integer; got {steps!r}")
            sched.plan(steps)
        if "guidance_scale" in p:
            g = p["guidance_scale"]
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g):
                raise TypeError(f"guidance_scale must be a number; got {g!r}")
        for name in (*OPTION_PARAMS, *IP_PARAMS):
            if name in job.params and name not in self.accepts:
                raise ValueError(f"{name}: the {self.kind} pipeline of model {self.name!r} takes no {name}")
        if "lora_scale" in job.params or "lora_weights" in job.params:  # the bundle's LoRA names, numbers
            self.pipe.check_lora_arguments(lora_scale=p.get("lora_scale"), lora_weights=p.get("lora_weights"))
        if "freeu" in job.params:  # the UNet graph must take FreeU
            self.pipe.check_freeu_argument(p["freeu"])
        ip = {k: job.params[k] for k in IP_PARAMS if k in job.params}
        if ip:  # the bundle has an IP-Adapter, the scale is a number
            ip_adapter_request(self.pipe, ip)

    def submit(self, job: Job) -> Future:
        """Queue ``job`` (after :meth:`check`); its ``future`` gets a :class:`Result` or the error.
        Raises :class:`QueueFull` (429) or :class:`Draining` (503) instead of queueing."""
        if job.timeout_s is None and self.timeout_s:
            job.timeout_s = self.timeout_s
            job.deadline = job.created + self.timeout_s
        self.check(job)
        with self._cond:
            if self._closing:
                raise Draining("the server is shutting down and takes no new work; retry on another replica")
            self._drop_stopped(time.monotonic())  # a cancelled or expired job holds no room
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{self.name}: the queue is full ({self.max_queue} requests waiting, --max-queue); "
                                "retry later", retry_after=self.retry_after())
            self._queue.append(job)
            self.observer.queue_depth(self.name, len(self._queue))
            self._cond.notify_all()
        return job.future

    def retry_after(self) -> int:
        """Seconds until the queue has likely room again (whole seconds, at least 1)."""
        batches = len(self._queue) / self.max_batch + 1
        return max(1, math.ceil(batches * (self._batch_seconds or 1.0)))

    def interrupt(self) -> int:
        """Stop the running batch (A1111's interrupt); returns how many jobs were stopped."""
        jobs = list(self._running)
        for j in jobs:
            j.cancel(Interrupted("interrupted (/sdapi/v1/interrupt)"))
        return len(jobs)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def busy(self) -> bool:
        return bool(self._queue or self._running)

    def drain(self) -> None:
        """Refuse new jobs (503); the queued and running ones still run."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while self.busy:
            if end is not None and time.monotonic() > end:
                return False
            time.sleep(0.02)
        return True

    def stop(self) -> None:
        self.drain()
        with self._cond:
            self._stopped = True
            for j in self._queue:
                j.fail(Draining("the server stopped before this request ran"))
            self._queue.clear()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # -- batching ----------------------------------------------------------------------------------
    def batch_key(self, job: Job) -> tuple:
        """Jobs with equal keys may share a pipeline call."""
        p = {**self.defaults, **job.params}
        if self.per_image_guidance:
            p.pop("guidance_scale", None)
        image = None if job.image is None else getattr(job.image, "size", np.shape(job.image))
        return tuple(sorted((k, repr(v)) for k, v in p.items())) + (("image", image),)

    def _drop_stopped(self, now: float) -> None:
        for j in [j for j in self._queue if j.stop_reason(now) is not None or j.done]:
            self._queue.remove(j)
            j.fail(j.stop_reason(now) or Cancelled("cancelled"))

    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                self._drop_stopped(time.monotonic())
                if self._queue or self._stopped:
                    break
                self._cond.wait(0.1)
            if self._stopped:
                return None
            first = self._queue[0]
            key = self.batch_key(first)
            until = time.monotonic() + self.batch_wait_s
            while True:
                batch, images = [], 0
                for j in self._queue:
                    if (j is first or self.batch_key(j) == key) and (not batch or images + j.n <= self.max_batch):
                        batch.append(j)
                        images += j.n
                left = until - time.monotonic()
                if images >= self.max_batch or left <= 0 or self._closing:
                    break
                self._cond.wait(left)
            for j in batch:
                self._queue.remove(j)
            self._running = batch
            self.observer.queue_depth(self.name, len(self._queue))
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            finally:
                self._running = []
                self.progress.update(step=0, steps=0, started=None, latents=None)

    def _run(self, jobs: list[Job]) -> None:
        t0 = time.monotonic()
        try:
            results = self._call(jobs)
        except _BatchStopped as stopped:
            with self._cond:  # batch-mates of a cancelled job run again first, from their seeds
                self._queue.extendleft(reversed([j for j in stopped.survivors if not j.done]))
                self._cond.notify_all()
            return
        except Exception as e:
            if len(jobs) > 1:  # one job's bad argument must not fail its batch-mates: run each alone
                for j in jobs:
                    self._running = [j]
                    self._run([j])
                return
            if not isinstance(e, (ValueError, TypeError, ServeError)):
                logger.exception("%s: pipeline call failed", self.name)
            jobs[0].fail(e)
            return
        seconds = time.monotonic() - t0
        self._batch_seconds = seconds if not self._batch_seconds else 0.7 * self._batch_seconds + 0.3 * seconds
        images = sum(j.n for j in jobs)
        self.observer.batch(self.name, images, seconds, results[0].timings)
        for j, r in zip(jobs, results):
            j.finish(r)

    def _call(self, jobs: list[Job]) -> list[Result]:
        """One pipeline call for ``jobs`` (equal batch keys); each gets its own rows back."""
        pipe, first = self.pipe, jobs[0]
        kwargs = {k: v for k, v in {**self.defaults, **first.params}.items() if k in self.accepts}
        rows = list(itertools.accumulate([0] + [j.n for j in jobs]))
        if self.kind in BATCHABLE:
            rngs = [np.random.default_rng(j.seed) for j in jobs]
            kwargs["prompt"] = [j.prompt for j in jobs for _ in range(j.n)]
            if any(j.negative_prompt for j in jobs):
                kwargs["negative_prompt"] = [j.negative_prompt or "" for j in jobs for _ in range(j.n)]
            if self.per_image_guidance and len(jobs) > 1:
                g = [{**self.defaults, **j.params}.get("guidance_scale") for j in jobs]
                kwargs["guidance_scale"] = [x for x, j in zip(g, jobs) for _ in range(j.n)]
            if first.image is not None:  # encode each input with its job's generator, as a lone call does
                pipe.select_vae(kwargs.get("vae"))
                kwargs["image"] = np.concatenate([pipe.encode_image(j.image, j.n, g) for j, g in zip(jobs, rngs)])
            kwargs["generator"] = GroupNoise(list(zip(rngs, [j.n for j in jobs])))
            kwargs["num_images_per_prompt"] = 1
        else:  # one job per call (max_batch is 1 for these kinds)
            kwargs.update(prompt=first.prompt, generator=first.seed, image=first.image)
            if first.negative_prompt:
                kwargs["negative_prompt"] = first.negative_prompt
            if "num_images_per_prompt" in self.accepts:
                kwargs["num_images_per_prompt"] = first.n
        steps = int(kwargs.get("num_inference_steps") or 0)
        self.progress.update(step=0, steps=steps, started=time.monotonic(), latents=None)
        kwargs["callback_on_step_end"] = self._step_hook(jobs, rows, steps)
        if self.safety_checker is not None and "safety_checker" in self.accepts:
            kwargs["safety_checker"] = self.safety_checker
        out = pipe(output_type="pil", **kwargs)
        nsfw = getattr(out, "nsfw_content_detected", None)
        return [Result(out.images[a:b], j.seed, out.timings, rows[-1], None if nsfw is None else list(nsfw[a:b]))
                for j, a, b in zip(jobs, rows, rows[1:])]

    def _step_hook(self, jobs: list[Job], rows: list[int], steps: int):
        def hook(pipe, i, t, tensors):
            now = time.monotonic()
            stopped = [(j, j.stop_reason(now)) for j in jobs if j.stop_reason(now) is not None or j.done]
            for j, reason in stopped:
                j.fail(reason or Cancelled("cancelled"))
                if j.cancelled_at is not None:
                    self.observer.cancelled(self.name, i + 1 - j.cancelled_at[1], now - j.cancelled_at[0])
            if stopped:
                raise _BatchStopped([j for j in jobs if not j.done])
            latents = tensors.get("denoised", tensors["latents"])
            self.progress.update(step=i + 1, latents=latents)
            for j, a, b in zip(jobs, rows, rows[1:]):
                j.step = i + 1
                if j.on_step is not None:
                    try:
                        j.on_step(i + 1, steps, latents[a:b])
                    except Exception:  # a listener's problem (its client went away) is not the batch's
                        logger.exception("%s: on_step of a request failed; its previews stop", self.name)
                        j.on_step = None
            return tensors

        return hook
