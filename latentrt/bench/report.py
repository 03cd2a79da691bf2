"""Turn benchmark JSON lines into Markdown tables, target checks and PNG charts.

Every latentrt figure is also a ratio against the diffusers baseline measured in the same run on the
same weights. The issue's targets are checked from the JSON lines alone: end-to-end speed-up (full VAE
and TAESD), PSNR against the fp32 reference, UNet step against its floor (FLOPs counted by torch over
the measured GEMM rate), runtime overhead outside the engines, peak RSS against weight bytes, and the
second load against the first.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from . import SCHEMA
from .env import floor_rate_gflops

#: (name, comparison, target) of the issue's targets
TARGETS = {
    "e2e_speedup_full_vae": (">=", 2.0),
    "psnr_db": (">=", 30.0),
    "e2e_speedup_taesd_vs_diffusers_full": (">=", 4.0),
    "unet_step_vs_floor": ("<=", 1.5),
    "overhead_fraction": ("<", 0.01),
    "peak_rss_vs_weights": ("<=", 1.3),
    "second_load_speedup": (">=", 3.0),
    # against the OpenVINO peers (issue 18), measured in the same run on the same weights
    "e2e_speedup_vs_best_peer": (">=", 1.5),
    "taesd_e2e_s": ("<=", 2.5),
    "new_process_load_s": ("<=", 2.0),
    # load + first image - a warm image: what a new process costs beyond the image's own time
    "new_process_first_use_s": ("<=", 2.0),
    "new_process_load_vs_best_peer": ("<", 1.0),
    "peak_rss_vs_best_peer": ("<=", 1.0),
    "peer_same_weights_psnr_db": (">=", 30.0),
}
from .peers import NAMES as PEER_SYSTEMS  # noqa: E402  (the systems that count as peers)


def peers_of(results: list[dict], rec: dict) -> list[dict]:
    """The peer records of ``rec``'s run and scenario."""
    return [r for r in results if r["run_id"] == rec["run_id"] and r["scenario"] == rec["scenario"]
            and r["system"] in PEER_SYSTEMS]


def best_peer(results: list[dict], rec: dict) -> dict | None:
    """The fastest peer (end-to-end median) of ``rec``'s run and scenario that ran the same weights."""
    peers = [p for p in peers_of(results, rec) if (p.get("quality") or {}).get("same_weights", True)]
    return min(peers, key=lambda p: p["e2e"]["median"]) if peers else None


def new_process_load(rec: dict) -> float | None:
    """Load time of a new process on an already-used bundle / model (latentrt's probe, a peer's second
    process)."""
    cold = rec.get("cold_start", {})
    return (cold.get("new_process") or {}).get("load_s") if rec["system"] == "latentrt" else cold.get("load_second_s")


def new_process_first_use(rec: dict) -> float | None:
    """What a new process on the already-used bundle / model costs beyond a warm image: its load plus
    its first image minus the warm end-to-end median (imports apart)."""
    cold = rec.get("cold_start", {})
    if rec["system"] == "latentrt":
        np_ = cold.get("new_process") or {}
        load, first = np_.get("load_s"), np_.get("first_image_s")
    else:
        load, first = cold.get("load_second_s"), cold.get("first_image_second_s")
    if load is None or first is None:
        return None
    return load + first - rec["e2e"]["median"]


def read_results(paths: Iterable[str | Path]) -> tuple[list[dict], list[dict]]:
    """(env records, result records) of JSON-lines files; unknown schemas are refused."""
    envs, results = [], []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such results file (write one with `latentrt bench -o FILE`)")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
            if rec.get("schema") != SCHEMA:
                raise ValueError(f"{path}:{n}: schema {rec.get('schema')!r} is not {SCHEMA!r}")
            (envs if rec.get("type") == "env" else results).append(rec)
    if not results:
        raise ValueError("no result lines in " + ", ".join(map(str, paths)))
    return envs, results


def _ms(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"


def _mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f} MiB"


def _x(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}x"


def _find(results, *, run_id, system, group):
    for r in results:
        if r["run_id"] == run_id and r["system"] == system and r["group"] == group:
            return r
    return None


def _group_with_vae(group: str, vae: str) -> str:
    return group.rsplit("|", 1)[0] + "|" + vae


def vae_stage(rec: dict) -> str | None:
    for k in ("vae_decoder", "tiny_vae_decoder"):
        if k in rec["stages"]:
            return k
    return None


def text_encoder_stages(rec: dict) -> list[str]:
    """The text encoder stages of a record: ``text_encoder``, and ``text_encoder_2`` for SDXL."""
    return [k for k in ("text_encoder", "text_encoder_2") if k in rec["stages"]]


def text_encoder_total(rec: dict) -> float | None:
    """Median time per call in the text encoders (both of SDXL's, summed)."""
    meds = [rec["stages"][k]["total"]["median"] for k in text_encoder_stages(rec)]
    return sum(meds) if meds else None


def unet_flops(results, rec) -> int | None:
    """UNet FLOPs per call for this record's model/size/batch, from any baseline of the same run."""
    prefix = rec["group"].rsplit("|", 1)[0]
    for r in results:
        if r["run_id"] == rec["run_id"] and r["group"].rsplit("|", 1)[0] == prefix and r.get("flops", {}).get("unet"):
            return r["flops"]["unet"]
    return None


def _holds(value: float, op: str, target: float) -> bool:
    return {">=": value >= target, "<=": value <= target, "<": value < target}[op]


def _factor(f: float) -> str:
    """A margin factor at 2 decimals, more where 2 would round a miss or a near miss to 1.00."""
    for digits in range(2, 6):
        text = f"{f:.{digits}f}"
        if float(text) != 1.0 or f == 1.0:
            return text
    return f"{f:.5f}"


@dataclass
class Check:
    name: str
    scenario: str
    value: float | None
    op: str
    target: float
    detail: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return None
        return _holds(self.value, self.op, self.target)

    @property
    def shown(self) -> str:
        """The value at 3 significant digits, or as many more as it takes not to read as the other side of the
        target (1.4955 against ">= 1.5" shows as 1.496, not 1.5); "-" where nothing was measured."""
        if self.value is None:
            return "-"
        if self.met is None:  # NaN
            return f"{self.value:.3g}"
        for digits in range(3, 10):
            text = f"{self.value:.{digits}g}"
            if _holds(float(text), self.op, self.target) == self.met:
                return text
        return repr(self.value)

    @property
    def margin(self) -> str:
        """How far from the target, as a factor: >1 is the factor by which it must improve."""
        if self.met is None:
            return "not measured"
        v, t = self.value, self.target
        if self.op == ">=":
            f = t / v if v else math.inf
        else:
            f = v / t if t else math.inf
        return f"met with {_factor(1 / f)}x headroom" if self.met else f"missed: needs {_factor(f)}x improvement"

    def to_dict(self) -> dict:
        return {"check": self.name, "scenario": self.scenario, "value": self.value, "op": self.op, "target": self.target,
                "met": self.met, "margin": self.margin, "detail": self.detail}


def target_checks(envs: list[dict], results: list[dict]) -> list[Check]:
    ours = [r for r in results if r["system"] == "latentrt"]
    flagged = [r for r in ours if r["settings"].get("targets")]
    gemm = {e["run_id"]: e.get("gemm") for e in envs}
    checks = []
    for r in flagged or ours:
        sc, med = r["scenario"], r["e2e"]["median"]
        base_full = _find(results, run_id=r["run_id"], system="diffusers", group=_group_with_vae(r["group"], "full"))
        if r["vae"] == "full" and base_full:
            checks.append(Check("e2e_speedup_full_vae", sc, base_full["e2e"]["median"] / med, *TARGETS["e2e_speedup_full_vae"],
                                f"diffusers {_ms(base_full['e2e']['median'])} / latentrt {_ms(med)}"))
        if r["vae"] == "tiny" and base_full:
            checks.append(Check("e2e_speedup_taesd_vs_diffusers_full", sc, base_full["e2e"]["median"] / med,
                                *TARGETS["e2e_speedup_taesd_vs_diffusers_full"],
                                f"diffusers full VAE {_ms(base_full['e2e']['median'])} / latentrt TAESD {_ms(med)}"))
        if "quality" in r:
            checks.append(Check("psnr_db", sc, r["quality"]["psnr_db"], *TARGETS["psnr_db"], r["quality"]["reference"]))
            g = r["quality"].get("gate")
            if g:
                checks.append(Check("quality_gate_psnr_min_db", sc, g["psnr_min_db"], ">=", g["threshold_db"],
                                    f"{g['samples']} prompts/seeds vs diffusers fp32: PSNR mean {g['psnr_mean_db']:.1f} dB, "
                                    f"mean abs pixel error <= {g['mean_abs_error_255_max']:.2f}/255; {g['verdict']}"))
        fl, unet = unet_flops(results, r), r["stages"].get("unet")
        prec = (r.get("compute_precision") or {}).get("unet", r["precision"])
        rate = floor_rate_gflops(gemm.get(r["run_id"]), prec)
        if fl and unet and rate:
            floor = fl / (rate * 1e9)
            checks.append(Check("unet_step_vs_floor", sc, unet["per_call"]["median"] / floor, *TARGETS["unet_step_vs_floor"],
                                f"{_ms(unet['per_call']['median'])} per step vs floor {_ms(floor)} = "
                                f"{fl / 1e9:.0f} GFLOP / {rate:.0f} GFLOP/s ({prec})"))
        checks.append(Check("overhead_fraction", sc, r["overhead"]["fraction_median"], *TARGETS["overhead_fraction"],
                            f"{_ms(r['overhead']['median'])} outside engines per call"))
        mem = r.get("memory", {})
        iso = mem.get("isolated") or {}
        if iso.get("peak_rss_bytes") and iso.get("weight_bytes"):
            checks.append(Check("peak_rss_vs_weights", sc, iso["peak_rss_bytes"] / iso["weight_bytes"],
                                *TARGETS["peak_rss_vs_weights"],
                                f"runtime alone (fresh process, load + 1 call): peak RSS {_mb(iso['peak_rss_bytes'])}, "
                                f"of which {_mb(iso['rss_after_imports_bytes'])} after imports, vs weights "
                                f"{_mb(iso['weight_bytes'])}"))
        elif mem.get("weight_bytes"):
            where = "own-process (isolate)" if mem.get("own_process") else "in-process"
            checks.append(Check("peak_rss_vs_weights", sc, mem["peak_rss_delta_bytes"] / mem["weight_bytes"],
                                *TARGETS["peak_rss_vs_weights"],
                                f"{where} peak RSS growth {_mb(mem['peak_rss_delta_bytes'])} (absolute "
                                f"{_mb(mem['peak_rss_bytes'])}) vs weights {_mb(mem['weight_bytes'])}; an estimate: "
                                "earlier phases' freed memory may be reused"))
        cold = r.get("cold_start", {})
        if cold.get("load_second_s"):
            checks.append(Check("second_load_speedup", sc, cold["load_speedup"], *TARGETS["second_load_speedup"],
                                f"first load {_ms(cold['load_first_s'])}, second {_ms(cold['load_second_s'])}"))
        checks += peer_checks(results, r)
    return checks


def peer_checks(results: list[dict], r: dict) -> list[Check]:
    """The issue-18 targets of latentrt record ``r`` against the peers of its run and scenario."""
    sc, med, out = r["scenario"], r["e2e"]["median"], []
    for p in peers_of(results, r):
        q = p.get("quality") or {}
        if "psnr_db" in q:
            out.append(Check("peer_same_weights_psnr_db", sc, q["psnr_db"], *TARGETS["peer_same_weights_psnr_db"],
                             f"{p['system']} vs diffusers fp32, same weights and noise (below: not the same model)"))
    extra = new_process_first_use(r)
    if extra is not None:
        np_ = r["cold_start"]["new_process"]
        theirs = [f"{p['system']} {_ms(e)}" for p in peers_of(results, r) if (e := new_process_first_use(p)) is not None]
        out.append(Check("new_process_first_use_s", sc, extra, *TARGETS["new_process_first_use_s"],
                         f"new process: load {_ms(np_['load_s'])} + first image {_ms(np_['first_image_s'])} - warm image "
                         f"{_ms(med)}" + (f"; the peers' new process the same way (imports apart): {', '.join(theirs)}"
                                          if theirs else "")))
    best = best_peer(results, r)
    if r["vae"] == "tiny":
        out.append(Check("taesd_e2e_s", sc, med, *TARGETS["taesd_e2e_s"], f"latentrt with TAESD {_ms(med)}"))
    if best is None:
        return out
    name = best["system"]
    if r["vae"] == "full":
        out.append(Check("e2e_speedup_vs_best_peer", sc, best["e2e"]["median"] / med, *TARGETS["e2e_speedup_vs_best_peer"],
                         f"{name} {_ms(best['e2e']['median'])} / latentrt {_ms(med)}"))
    ours = new_process_load(r)
    if ours is not None:
        first = (r["cold_start"].get("new_process") or {}).get("first_image_s")
        out.append(Check("new_process_load_s", sc, ours, *TARGETS["new_process_load_s"],
                         f"new process on the used bundle: load {_ms(ours)}, then its first image {_ms(first)}"))
        theirs = [(new_process_load(p), p["system"]) for p in peers_of(results, r) if new_process_load(p)]
        if theirs:
            t, who = min(theirs)
            out.append(Check("new_process_load_vs_best_peer", sc, ours / t, *TARGETS["new_process_load_vs_best_peer"],
                             f"latentrt {_ms(ours)} vs {who} {_ms(t)} (new process, caches warm)"))
    rss = [(p["memory"].get("peak_rss_bytes"), p["system"]) for p in peers_of(results, r) if p.get("memory")]
    if r.get("memory", {}).get("peak_rss_bytes") and rss:
        t, who = min(rss)
        out.append(Check("peak_rss_vs_best_peer", sc, r["memory"]["peak_rss_bytes"] / t, *TARGETS["peak_rss_vs_best_peer"],
                         f"latentrt {_mb(r['memory']['peak_rss_bytes'])} vs {who} {_mb(t)} (lowest peer)"))
    return out


def results_table(results: list[dict]) -> str:
    head = ("| scenario | system | backend | precision | VAE | e2e median | p90 | p99 | vs diffusers (its VAE) | "
            "vs best peer | PSNR | text encoders | UNet / step | VAE decode | overhead | peak RSS | weights | "
            "load 1st / 2nd | new process load | cold start |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        base = None
        if r["system"] != "diffusers":  # the baseline of the same scenario (its VAE may differ: TAESD vs full)
            base = next((b for b in results if b["run_id"] == r["run_id"] and b["system"] == "diffusers"
                         and b["scenario"] == r["scenario"]), None)
        speed = base["e2e"]["median"] / r["e2e"]["median"] if base else None
        peer = best_peer(results, r) if r["system"] == "latentrt" else None
        vs_peer = f"{_x(peer['e2e']['median'] / r['e2e']['median'])} ({peer['system']})" if peer else "-"
        q = (r.get("quality") or {}).get("psnr_db")
        psnr_cell = "-" if q is None else f"{q:.1f} dB" + ("" if (r.get("quality") or {}).get("same_weights", True)
                                                            else " (**not the same model**)")
        gate = (r.get("quality") or {}).get("gate")
        if gate:
            psnr_cell += (f"; gate min {gate['psnr_min_db']:.1f} dB over {gate['samples']}"
                          + ("" if gate["passed"] else " (**not recommended**)"))
        st = r["stages"]
        te = text_encoder_total(r)
        unet = st.get("unet", {}).get("per_call", {}).get("median")
        vs = vae_stage(r)
        vae = st[vs]["total"]["median"] if vs else None
        cold, mem = r.get("cold_start", {}), r.get("memory", {})
        loads = f"{_ms(cold.get('load_first_s', cold.get('load_s')))} / {_ms(cold.get('load_second_s'))}"
        prec = r["precision"]
        compute = r.get("compute_precision") or {}
        unet_prec = compute.get("unet")
        others = [f"{c} {p}" for c, p in sorted(compute.items()) if unet_prec and p != unet_prec and p == "int8"]
        if unet_prec and (unet_prec != prec or others):
            prec += f" ({unet_prec} compute" + "".join(f"; {o}" for o in others) + ")"
        lines.append(
            f"| {r['scenario']} | {r['system']} | {r['backend']} | {prec} | {r['vae']} | {_ms(r['e2e']['median'])} | "
            f"{_ms(r['e2e']['p90'])} | {_ms(r['e2e']['p99'])} | {_x(speed)} | {vs_peer} | {psnr_cell} | {_ms(te)} | "
            f"{_ms(unet)} | {_ms(vae)} | {100 * r['overhead']['fraction_median']:.2f}% | {_mb(mem.get('peak_rss_bytes'))} | "
            f"{_mb(mem.get('weight_bytes'))} | {loads} | {_ms(new_process_load(r))} | {_ms(cold.get('cold_start_s'))} |")
    return "\n".join(lines)


#: stages of the unCLIP pipelines (label, stage, per-call or per-image-batch total)
EXTRA_STAGES = (("prior text encoder", "prior_text_encoder", "total"), ("prior step", "prior", "per_call"),
                ("image encoder", "image_encoder", "total"))


def stage_comparison(results: list[dict]) -> str:
    """Per stage, latentrt against the baseline of the same scenario: which stage a miss comes from."""
    lines = ["| scenario | stage | latentrt | diffusers | speed-up |", "|---|---|---|---|---|"]
    for r in results:
        if r["system"] != "latentrt":
            continue
        base = next((b for b in results if b["run_id"] == r["run_id"] and b["system"] == "diffusers"
                     and b["scenario"] == r["scenario"]), None)
        if base is None:
            continue
        rows = [("text encoder" + (" 2" if k.endswith("_2") else ""), k, k, "total") for k in text_encoder_stages(r)]
        rows += [(label, k, k, kind) for label, k, kind in EXTRA_STAGES]
        rows += [("VAE encode", enc, enc, "total") for enc in ("vae_encoder", "tiny_vae_encoder")]
        rows += [("UNet step", "unet", "unet", "per_call"), ("VAE decode", vae_stage(r), vae_stage(base), "total")]
        for label, ours_k, base_k, kind in rows:
            a = r["stages"].get(ours_k or "", {}).get(kind, {}).get("median")
            b = base["stages"].get(base_k or "", {}).get(kind, {}).get("median")
            if a is None or b is None:
                continue
            if ours_k != base_k:
                label += f" ({ours_k} vs {base_k})"
            lines.append(f"| {r['scenario']} | {label} | {_ms(a)} | {_ms(b)} | {_x(b / a if a else None)} |")
        lines.append(f"| {r['scenario']} | outside engines | {_ms(r['overhead']['median'])} | "
                     f"{_ms(base['overhead']['median'])} | - |")
    return "\n".join(lines)


def priming_table(results: list[dict]) -> str | None:
    """What the fresh process that filled a bundle's caches before latentrt was measured (``memory.primed``,
    ``isolate`` runs) took: on an empty cache this is the one-time work (an int8 calibration, IR conversion,
    compiles), whose memory a user's machine must also hold once; None when no record has one."""
    rows = [r for r in results if r["system"] == "latentrt" and r.get("memory", {}).get("primed")]
    if not rows:
        return None
    lines = ["| scenario | load | first image | peak RSS |", "|---|---|---|---|"]
    for r in rows:
        p = r["memory"]["primed"]
        if "error" in p:
            lines.append(f"| {r['scenario']} | failed: {p['error'][-200:]} | - | - |")
            continue
        lines.append(f"| {r['scenario']} | {_ms(p.get('load_s'))} | {_ms(p.get('first_image_s'))} | "
                     f"{_mb(p.get('peak_rss_bytes'))} |")
    return "\n".join(lines)


def checks_table(checks: list[Check]) -> str:
    lines = ["| target | scenario | measured | goal | status | margin | how |", "|---|---|---|---|---|---|---|"]
    for c in checks:
        status = {True: "met", False: "**missed**", None: "n/a"}[c.met]
        lines.append(f"| {c.name} | {c.scenario} | {c.shown} | {c.op} {c.target:g} | {status} | {c.margin} | {c.detail} |")
    return "\n".join(lines)


def env_section(envs: list[dict]) -> str:
    out = []
    for e in envs:
        cpu, g = e.get("cpu", {}), e.get("gemm") or {}
        libs = ", ".join(f"{k} {v}" for k, v in e.get("libraries", {}).items() if k != "onnxruntime_providers")
        gemm = ", ".join(f"{k.replace('_gflops', '')} {v:.0f}" for k, v in g.items() if k.endswith("_gflops"))
        gpu = e.get("gpu")
        out.append(f"- run `{e['run_id']}` at {e['time']}: {cpu.get('model')} ({cpu.get('usable_cpus')} usable CPUs, "
                   f"{e.get('threads')} threads; flags {', '.join(cpu.get('flags', [])) or '-'}), "
                   f"memory {_mb(e.get('memory', {}).get('total_bytes'))}, GPU {gpu['name'] if gpu else 'none'}\n"
                   f"  - measured GEMM rate (GFLOP/s, {g.get('size', '?')}^3 matmul): {gemm or 'not measured'}\n"
                   f"  - {libs}")
    return "\n".join(out)


def charts(results: list[dict], out_dir: Path) -> list[Path]:
    """e2e.png (median end-to-end per scenario and system) and stages.png (where the time goes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    import textwrap

    # long scenario names wrap (on their dashes) instead of running into the next bar's label
    labels = ["\n".join(textwrap.wrap(r["scenario"].replace("-", "- "), 22)).replace("- ", "-") + f"\n{r['system']}"
              for r in results]
    paths = []

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(results)), 4))
    colors = ["tab:blue" if r["system"] == "latentrt" else "tab:gray" for r in results]
    meds = [r["e2e"]["median"] for r in results]
    ax.bar(range(len(results)), meds, color=colors)
    ax.errorbar(range(len(results)), meds, yerr=[[0] * len(results), [r["e2e"]["p90"] - r["e2e"]["median"] for r in results]],
                fmt="none", ecolor="black", capsize=3)
    ax.set_xticks(range(len(results)), labels, fontsize=7)
    ax.set_ylabel("seconds per call (median, bar to p90)")
    ax.set_title("End-to-end latency")
    fig.tight_layout()
    paths.append(out_dir / "e2e.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(results)), 4))
    names = list(dict.fromkeys(k for r in results for k in r["stages"]))
    bottom = [0.0] * len(results)
    for name in names + ["overhead"]:
        vals = [r["overhead"]["median"] if name == "overhead" else r["stages"].get(name, {}).get("total", {}).get("median", 0.0)
                for r in results]
        ax.bar(range(len(results)), vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(results)), labels, fontsize=7)
    ax.set_ylabel("seconds per call (medians)")
    ax.set_title("Where the time goes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "stages.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(paths: Iterable[str | Path], out_dir: str | Path, *, title: str = "latentrt benchmarks",
                 command: str | None = None, name: str = "report.md") -> Path:
    """Write ``out_dir/<name>`` (+ ``e2e.png``, ``stages.png``, ``checks.json``); returns the .md path."""
    paths = list(paths)
    envs, results = read_results(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checks = target_checks(envs, results)
    pngs = charts(results, out_dir)
    (out_dir / "checks.json").write_text(json.dumps([c.to_dict() for c in checks], indent=2) + "\n")
    parts = [f"# {title}", ""]
    if command:
        parts += ["Produced by:", "", "```", command, "```", ""]
    parts += ["## Environment", "", env_section(envs), "", "## Results", "",
              "Medians over the repeats; every latentrt row is compared with the diffusers baseline of the same run "
              "(same weights, size, steps, batch and VAE). UNet / step is per call; text encoders (both of SDXL's, summed) and VAE per image batch; "
              "overhead is time outside the engines.", "", results_table(results), "",
              "### Per stage", "", stage_comparison(results), ""]
    primed = priming_table(results)
    if primed:
        parts += ["### Before measuring: the priming process", "",
                  "With `isolate`, a fresh process loads the bundle and makes one call before latentrt is measured, so "
                  "that one-time work filling the bundle's caches (an int8 calibration, IR conversion, compiles) is in "
                  "neither the measured load nor the measured peak RSS. On an empty cache its figures are that one-time "
                  "work's; on filled caches, a new process's.", "", primed, ""]
    parts += ["## Targets", "",
              ("Checked on the scenarios marked `targets = true`." if any(r["settings"].get("targets") for r in results)
               else "No scenario is marked `targets = true`, so the benchmark issue's CPU targets are applied to every "
                    "latentrt scenario as yardsticks.")
              + " The margin is the factor still needed (missed) or "
              "to spare (met); the per-stage table above shows which stage a miss comes from.", "",
              checks_table(checks), "", "## Charts", ""]
    parts += [f"![{p.stem}]({p.name})" for p in pngs]
    md = out_dir / name
    md.write_text("\n".join(parts) + "\n")
    return md
