"""One system of one scenario, measured in a fresh child process (a scenario's ``isolate``).

Full-size SDXL at 1024x1024 does not fit twice in memory: the fp32 diffusers baseline needs ~14 GB
and latentrt's engines ~8 GB, so on a 24 GiB machine they cannot share the benchmark process. With
``isolate`` the parent (:class:`latentrt.bench.harness.Runner`) starts, for each system in turn,

    python -m latentrt.bench.child JOB_DIR

where ``JOB_DIR/job.json`` holds the scenario, the system ("latentrt" or a baseline name), the bundle
and the run id. The child runs the very code of an in-process run (``Runner.measure_latentrt`` /
``Runner.measure_baseline``), writes ``result.json`` (the result record, written atomically) and
``image.npy`` (its first image), and exits; the parent emits the record, keeps the image for PSNR
(:meth:`Runner.add_quality`) and reuses baselines as before. So each system's memory is its own and
never adds up with the other's, and each record's peak RSS is its own process's.

Progress: the child prints one marked line per call on its stdout (``PROTOCOL``), which the parent
turns into steps of its progress bar as they happen; everything else the child would print goes to
its stderr, which is kept in ``JOB_DIR/stderr.txt``. A child that fails makes the parent raise
:class:`ChildError` naming the scenario, the system, the exit status and the child's last stderr lines;
nothing is emitted for it, so the JSON-lines file never gets a partial line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: the prefix of the child's progress lines on its stdout: PROTOCOL + "step|note" + TAB + description
PROTOCOL = "\x1flatentrt-bench-child\t"
#: stderr lines of a failed child quoted in the parent's error
TAIL_LINES = 25


class ChildError(RuntimeError):
    """A system's child process failed (or produced no result)."""


class PipeProgress:
    """The child's side of the progress bar: ``step`` / ``note`` as marked lines on a stream."""

    bar = None  # the harness asks ``bar.bar`` only in the parent

    def __init__(self, stream):
        self.stream = stream

    def _send(self, kind: str, desc: str) -> None:
        self.stream.write(f"{PROTOCOL}{kind}\t{' '.join(str(desc).split())}\n")
        self.stream.flush()

    def step(self, desc: str) -> None:
        self._send("step", desc)

    def note(self, desc: str) -> None:
        self._send("note", desc)


def _tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no stderr captured)"
    lines = [ln for ln in lines if ln.strip()]
    return "\n".join(lines[-n:]) if lines else "(stderr was empty)"


def run_job(cmd: list[str], job_dir: Path, bar, *, env: dict, what: str, context: str = "",
            outputs=("result.json", "image.npy")) -> float:
    """Run ``cmd`` (a child that writes ``outputs`` into ``job_dir``), turning its protocol lines into
    progress steps; returns its wall time, or raises :class:`ChildError` naming ``what`` (the scenario and
    system), the exit status and the child's last stderr lines (kept in ``job_dir/stderr.txt``)."""
    t0 = time.perf_counter()
    with open(job_dir / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True, encoding="utf-8", errors="replace", env=env)
        try:
            for line in proc.stdout:  # ends when the child exits (or closes its stdout)
                if line.startswith(PROTOCOL):
                    kind, _, desc = line[len(PROTOCOL):].rstrip("\n").partition("\t")
                    (bar.step if kind == "step" else bar.note)(desc)
            code = proc.wait()
        finally:
            if proc.poll() is None:  # the parent was interrupted: do not leave the child running
                proc.kill()
                proc.wait()
            proc.stdout.close()
    wall = time.perf_counter() - t0
    if code != 0 or not all((job_dir / o).is_file() for o in outputs):
        if code < 0:
            why = f"killed by signal {-code}" + (" - out of memory?" if code == -9 else "")
        else:
            why = f"exited with status {code}" if code else "exited without writing its result"
        tail = _tail(job_dir / "stderr.txt")
        raise ChildError(f"{what} failed in its own process ({context}pid {proc.pid}, {why}): {tail.splitlines()[-1]}\n"
                         f"Last lines of its stderr:\n{tail}")
    return wall


def run_in_child(runner, sc, bundle: Path, bar, system: str) -> tuple[dict, object]:
    """Measure ``system`` ("latentrt" or a baseline name) of scenario ``sc`` in a fresh process; returns
    (result record, first image) as ``Runner.measure_latentrt`` / ``measure_baseline`` do in-process."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="latentrt-bench-child-") as tmp:
        job_dir = Path(tmp)
        (job_dir / "job.json").write_text(json.dumps({
            "scenario": sc.to_dict(), "system": system, "bundle": str(bundle), "run_id": runner.run_id,
            "cache_dir": str(runner.cache_dir) if runner.cache_dir else None}))
        bar.note(f"{sc.name}: {system} (starting its own process)")
        wall = run_job([sys.executable, "-m", "latentrt.bench.child", str(job_dir)], job_dir, bar,
                       env=dict(os.environ), what=f"scenario {sc.name!r}: {system}", context="isolate = true; ")
        rec = json.loads((job_dir / "result.json").read_text())
        rec.setdefault("process", {})["wall_s"] = wall
        return rec, np.load(job_dir / "image.npy")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m latentrt.bench.child JOB_DIR (started by the benchmark harness)", file=sys.stderr)
        return 2
    job_dir = Path(argv[0])
    # the progress protocol keeps the real stdout; anything else printed goes to stderr
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    import numpy as np

    from ..manifest import write_json_atomic
    from .harness import Runner
    from .scenarios import make_scenario

    job = json.loads((job_dir / "job.json").read_text())
    sc = make_scenario(job["scenario"], f"{job_dir}/job.json")
    runner = Runner(out_path=None, cache_dir=Path(job["cache_dir"]) if job.get("cache_dir") else None,
                    progress=False, gemm=False, log=lambda m: print(m, file=sys.stderr))
    runner.run_id = job["run_id"]
    bar, bundle, system = PipeProgress(proto), Path(job["bundle"]), job["system"]
    if system == "latentrt":
        rec, image = runner.measure_latentrt(sc, bundle, bar)
    elif system in sc.baselines:
        rec, image = runner.measure_baseline(sc, bundle, bar, system)
    else:
        raise ValueError(f"system {system!r} is neither latentrt nor a baseline of scenario {sc.name!r} "
                         f"({list(sc.baselines)})")
    rec["process"] = {"isolated": True, "pid": os.getpid(), "parent_pid": os.getppid()}
    np.save(job_dir / "image.npy", np.asarray(image))
    write_json_atomic(job_dir / "result.json", rec)
    proto.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
