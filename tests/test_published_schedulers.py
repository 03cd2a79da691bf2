"""Scheduler swaps on published checkpoints (issue 12, items 1 and 3).

Each tiny model carries a published repo's own files (``latentrt/export/published``). diffusers loads
the folder from disk with ``from_pretrained`` and swaps schedulers the way users do,
``AutoPipelineFor*.from_pipe(pipe, scheduler=X.from_config(pipe.scheduler.config))``; latentrt exports
the same folder once and runs ``scheduler="X"``. With every published scheduler file, every runtime
scheduler (and its ``+karras`` alias) must give diffusers' image within 1e-4 (fp32 bundle), for
text-to-image and image-to-image (unCLIP: image variations; the upscaler: latents in). Repos whose
scheduler files are another repo's byte for byte (SSD-1B ships SDXL base's, lcm-ssd-1b is used with
SSD-1B's, the unCLIP-small repo has the unCLIP one's) are built and loaded, not re-run. Old bundles
(every key written out, no ``scheduler_configs`` in the manifest) keep their own scheduler and refuse
only the swaps whose result they cannot tell.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import latentrt
from latentrt.export.tiny_published import (PUBLISHED, REPOS, published_constants, published_files,
                                            save_tiny_published, source_info)
from latentrt.manifest import BundleError
from latentrt.runtime.random import TorchGeneratorNoise
from latentrt.runtime.schedulers import ALIASES, get_scheduler, known_names

TOL = 1e-4
PROMPT = "a photograph of an astronaut riding a horse"
ALL = tuple(known_names())  # every runtime scheduler and its +karras alias

# repo -> (schedulers to swap to, img2img?, call keyword arguments)
SD_KW = dict(height=32, width=32, num_inference_steps=3, guidance_scale=5.0, negative_prompt="blurry")
LCM_KW = dict(height=32, width=32, num_inference_steps=3, guidance_scale=6.0)
CASES = {
    "runwayml/stable-diffusion-v1-5": (ALL, True, SD_KW),
    "stabilityai/stable-diffusion-2-1": (ALL, True, SD_KW),
    # diffusers' LatentConsistencyModel pipelines run only LCMScheduler (set_timesteps gets strength and
    # original_inference_steps)
    "SimianLuo/LCM_Dreamshaper_v7": (("LCMScheduler",), True, LCM_KW),
    "stabilityai/stable-diffusion-xl-base-1.0": (ALL, True, SD_KW),
    # the model cards: the LCM UNet in the base repo's folder, LCMScheduler.from_config(pipe.scheduler.config)
    "latent-consistency/lcm-sdxl": (("LCMScheduler", "EulerDiscreteScheduler"), True, LCM_KW),
    # the latent upscaler's loop is written for Euler (sigmas, log-sigma timesteps); its UNet predicts
    # the sample, which diffusers' (and our) Euler-ancestral refuses
    "stabilityai/sd-x2-latent-upscaler": (("EulerDiscreteScheduler", "EulerDiscreteScheduler+karras"), False,
                                          dict(num_inference_steps=3, guidance_scale=5.0)),
    # 4 steps: its DDIM file has no skip_prk_steps, so PNDMScheduler runs PRK steps, which diffusers
    # cannot plan for fewer than 4
    "stabilityai/stable-diffusion-2-1-unclip": (ALL, False, dict(height=32, width=32, num_inference_steps=4,
                                                                 guidance_scale=5.0, noise_level=50)),
}
#: repos whose files are another repo's (scheduler configs byte for byte): built and loaded, not re-run
SAME_FILES = {
    "segmind/SSD-1B": "stabilityai/stable-diffusion-xl-base-1.0",
    "latent-consistency/lcm-ssd-1b": "latent-consistency/lcm-sdxl",
    "stabilityai/stable-diffusion-2-1-unclip-small": "stabilityai/stable-diffusion-2-1-unclip",
}
#: the size components are traced at (the published sample sizes mean 512-1024 px by default); the
#: upscaler's K-UNet needs its own default
TRACE_SIZE = {"stabilityai/sd-x2-latent-upscaler": None}


def _diffusers_scheduler(name: str, config):
    import diffusers

    cls_name, extra = ALIASES.get(name, (name, {}))
    return getattr(diffusers, cls_name).from_config(config, **extra)


class Published:
    """One repo: its tiny folder, the diffusers pipeline loaded from it, the exported bundle."""

    def __init__(self, repo, root):
        import diffusers

        self.repo = repo
        self.folder = save_tiny_published(root / "model", repo)
        self.ref = diffusers.DiffusionPipeline.from_pretrained(str(self.folder), dtype=torch.float32,
                                                               safety_checker=None)
        self.ref.set_progress_bar_config(disable=True)
        from latentrt.export.bundle import export_bundle

        self.bundle = root / "bundle"
        export_bundle(self.folder, self.bundle, check="off", trace_size=TRACE_SIZE.get(repo, 32),
                      progress=lambda *_: None)
        self.ours = latentrt.load(self.bundle)

    def reference(self, name: str | None, img2img: bool):
        """The user's pipeline: ``AutoPipelineFor*.from_pipe`` of the loaded one, its scheduler swapped
        with ``X.from_config(pipe.scheduler.config)`` (``name=None``: the loaded one's)."""
        import diffusers

        kw = {} if name is None else {"scheduler": _diffusers_scheduler(name, self.ref.scheduler.config)}
        if not img2img and not kw:
            return self.ref
        cls = diffusers.AutoPipelineForImage2Image if img2img else type(self.ref)
        pipe = cls.from_pipe(self.ref, **kw)
        pipe.set_progress_bar_config(disable=True)
        return pipe


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """``published(repo)``: the repo's :class:`Published`, built once per module."""
    cache: dict[str, Published] = {}

    def get(repo):
        if repo not in cache:
            cache[repo] = Published(repo, tmp_path_factory.mktemp(repo.replace("/", "--")))
        return cache[repo]

    return get


def _inputs(repo, img2img):
    """The call's keyword arguments (torch tensors for diffusers; :func:`_images` converts them)."""
    from PIL import Image

    kw = dict(CASES[repo][2], prompt=PROMPT)
    rng = np.random.default_rng(3)
    if "upscaler" in repo:  # SD latents in
        kw["image"] = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    elif "unclip" in repo:  # the image to make variations of
        kw["image"] = Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8))
    elif img2img:
        kw["image"] = Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
        kw["strength"] = 0.7
        del kw["height"], kw["width"]
    return kw


def _images(p: Published, name, img2img, seed=5):
    kw = _inputs(p.repo, img2img)
    want = p.reference(name, img2img)(**kw, generator=torch.Generator().manual_seed(seed), output_type="np").images
    ours_kw = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    got = p.ours(**ours_kw, scheduler=name, generator=TorchGeneratorNoise(seed), output_type="np").images
    return got, want


def _cases():
    for repo, (names, img2img, _) in CASES.items():
        for name in names:
            yield pytest.param(repo, name, False, id=f"{repo}-{name}-txt2img")
            if img2img:
                yield pytest.param(repo, name, True, id=f"{repo}-{name}-img2img")


def test_every_repo_has_a_case_and_a_source_note():
    assert set(CASES) | set(SAME_FILES) == set(REPOS) and not set(CASES) & set(SAME_FILES)
    for repo in REPOS:
        info = source_info(repo)
        assert info["repo"] == repo and info["obtained"]
        files = published_files(repo)
        assert "model_index.json" in files and "scheduler/scheduler_config.json" in files
        own = info.get("files", {})
        assert all(rel in files for rel in own), "SOURCE.json notes a file that is not stored"
        assert info.get("base") or set(own) == set(files), "every stored file has its provenance line"


def test_the_folder_carries_the_published_files(published):
    p = published("runwayml/stable-diffusion-v1-5")
    for rel, path in published_files(p.repo).items():
        assert (p.folder / rel).read_bytes() == path.read_bytes(), rel
    # the bundle keeps the scheduler file as published: no timestep_spacing, no prediction_type
    assert (p.bundle / "scheduler" / "scheduler_config.json").read_bytes() == \
        (p.folder / "scheduler" / "scheduler_config.json").read_bytes()
    assert p.ours.bundle.manifest.extra["scheduler_configs"] == {"scheduler": "source file"}
    assert p.ours.bundle.constants["vae_scaling_factor"] == 0.18215


@pytest.mark.parametrize("repo", list(CASES))
def test_tiny_models_carry_the_published_constants(repo, published):
    p = published(repo)
    constants = published_constants(repo)
    k = p.ours.bundle.constants
    index = json.loads(published_files(repo)["model_index.json"].read_text())
    assert type(p.ref).__name__ == index["_class_name"]
    for key, value in constants.items():
        module, _, attr = key.partition(".")
        if attr in ("scaling_factor", "force_upcast", "sample_size", "time_cond_proj_dim"):
            assert getattr(getattr(p.ref, module).config, attr) == value, key
    if "vae.scaling_factor" in constants:
        assert k["vae_scaling_factor"] == constants["vae.scaling_factor"]
    if "unet.time_cond_proj_dim" in constants:
        assert k["time_cond_proj_dim"] == constants["unet.time_cond_proj_dim"]
    if "unet.sample_size" in constants:
        assert k["default_height"] == constants["unet.sample_size"] * 8
    for key in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):
        if key in constants:
            assert p.ref.config.get(key, False) is k[key] is constants[key], key
    if "vae.force_upcast" in constants:
        assert k["vae_force_upcast"] is constants["vae.force_upcast"]
    want_prediction = str(constants.get("prediction_type", "epsilon")).split()[0]
    assert p.ref.scheduler.config.prediction_type == p.ours.scheduler.prediction_type == want_prediction


@pytest.mark.parametrize("repo", list(SAME_FILES))
def test_repos_sharing_scheduler_files(repo, tmp_path):
    """Their scheduler files are the tested repo's byte for byte; their tiny folders build and load."""
    import diffusers

    tested = SAME_FILES[repo]
    mine, theirs = published_files(repo), published_files(tested)
    scheds = [rel for rel in mine if rel.endswith("scheduler_config.json")]
    assert scheds and all(mine[rel].read_bytes() == theirs[rel].read_bytes() for rel in scheds)
    folder = save_tiny_published(tmp_path / "model", repo)
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    assert type(pipe).__name__ == json.loads(mine["model_index.json"].read_text())["_class_name"]
    for key, value in published_constants(repo).items():
        module, _, attr = key.partition(".")
        if attr in ("scaling_factor", "force_upcast", "sample_size", "time_cond_proj_dim"):
            assert getattr(getattr(pipe, module).config, attr) == value, key


@pytest.mark.parametrize("repo,name,img2img", list(_cases()))
def test_scheduler_swap_matches_diffusers(repo, name, img2img, published):
    got, want = _images(published(repo), name, img2img)
    assert got.shape == want.shape and np.isfinite(got).all()
    err = float(np.abs(got - want).max())
    assert err <= TOL, f"{repo} {name}: max abs image difference {err:.3g} > {TOL}"
    assert float(want.std()) > 1e-2


def _legacy_copy(p: Published, dest):
    """The bundle as exports before this change wrote it: save_config's every-key config, no marker."""
    shutil.copytree(p.bundle, dest)
    p.ref.scheduler.save_config(str(dest / "scheduler"))
    m = json.loads((dest / "latentrt.json").read_text())
    del m["extra"]["scheduler_configs"]
    (dest / "latentrt.json").write_text(json.dumps(m))
    return dest


def test_old_bundles_load_and_refuse_only_ambiguous_swaps(published, tmp_path):
    p = published("runwayml/stable-diffusion-v1-5")
    old = latentrt.load(_legacy_copy(p, tmp_path / "old"))
    kw = _inputs(p.repo, False)
    # the bundle's own scheduler is unaffected (its defaults were what save_config wrote out)
    want = p.ref(**kw, generator=torch.Generator().manual_seed(5), output_type="np").images
    got = old(**kw, generator=TorchGeneratorNoise(5), output_type="np").images
    assert float(np.abs(got - want).max()) <= TOL
    # a swap whose result depends on keys the file may have left out is refused, naming them
    with pytest.raises(BundleError, match=r"timestep_spacing: 'leading' if .* 'linspace' if .*re-export"):
        old(**kw, scheduler="EulerDiscreteScheduler", generator=0, output_type="np")
    # a swap nothing depends on still runs (PNDM -> DDPM: no shared key with differing defaults)
    old(**kw, scheduler="DDPMScheduler", generator=0, output_type="np")
    # what the old behaviour gave (the explicit Scheduler is the documented way around the refusal)
    stale = get_scheduler(old.scheduler_config, "EulerDiscreteScheduler")
    assert stale.timestep_spacing == "leading"
    want = p.reference("EulerDiscreteScheduler", False)(**kw, generator=torch.Generator().manual_seed(5),
                                                         output_type="np").images
    got = old(**kw, scheduler=stale, generator=TorchGeneratorNoise(5), output_type="np").images
    assert float(np.abs(got - want).max()) > 1e-2  # the bug: PNDM's spacing carried over


def test_in_memory_pipeline_exports_its_non_default_keys(tmp_path):
    """A pipeline that exists only in memory: the bundle gets the keys diffusers' from_config would
    see (those the scheduler was given), not every default written out."""
    from diffusers import DDPMScheduler, UnCLIPScheduler

    from latentrt.export.scheduler_files import in_memory_config

    karlo = json.loads(published_files("kakaobrain/karlo-v1-alpha")["prior_scheduler/scheduler_config.json"]
                       .read_text())
    # diffusers' StableUnCLIPPipeline docs: DDPMScheduler.from_config(UnCLIPScheduler(...).config);
    # beta_schedule was UnCLIPScheduler's default, so DDPM takes its own ("linear")
    prior = DDPMScheduler.from_config(UnCLIPScheduler.from_config(karlo).config)
    cfg = in_memory_config(prior)
    assert "beta_schedule" not in cfg and cfg["clip_sample_range"] == 5.0 and cfg["_class_name"] == "DDPMScheduler"
    ours = get_scheduler(cfg)
    assert ours.beta_schedule == prior.config.beta_schedule == "linear"
    np.testing.assert_array_equal(ours.alphas_cumprod, prior.alphas_cumprod.numpy())


def _published_scheduler_files():
    seen = {}
    for d in sorted(p for p in PUBLISHED.iterdir() if p.is_dir()):
        for path in sorted(d.rglob("scheduler_config.json")):
            seen.setdefault(path.read_bytes(), path)
    return list(seen.values())


def _one_step(sched):
    import inspect

    sched.set_timesteps(4)
    x = torch.ones((1, 4, 2, 2))
    kw = {"generator": torch.Generator().manual_seed(0)} if "generator" in inspect.signature(sched.step).parameters else {}
    sched.step(x, sched.timesteps[0], x, **kw)


@pytest.mark.parametrize("path", _published_scheduler_files(), ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_config_rule_matches_diffusers_for_every_published_file(path):
    """Config level, every runtime scheduler: our ``get_scheduler(file, X)`` takes the values
    diffusers' ``X.from_config(Source.from_config(file).config)`` takes; the same from diffusers'
    in-memory config dict (with ``_use_default_values``) and after a second swap (X -> Y)."""
    import diffusers

    file = json.loads(path.read_text())
    source = getattr(diffusers, file["_class_name"]).from_config(file)
    for name in ALL:
        ref = _diffusers_scheduler(name, source.config)
        try:
            get_scheduler(file, name)
        except ValueError as e:  # refused up front only where diffusers cannot step either
            assert name.split("+")[0] in str(e)
            with pytest.raises((ValueError, NotImplementedError)):
                _one_step(ref)
            continue
        for cfg in (file, dict(source.config)):
            ours = get_scheduler(cfg, name)
            for key in ours.config_keys():
                want = ref.config[key]
                assert getattr(ours, key) == (tuple(want) if isinstance(want, list) else want), (name, key)
        for second in ("EulerDiscreteScheduler", "DDIMScheduler"):
            ref2 = _diffusers_scheduler(second, ref.config)
            ours2 = get_scheduler(dict(ref.config), second)
            assert {k: getattr(ours2, k) for k in ours2.config_keys()} == \
                {k: (tuple(v) if isinstance(v, list) else v) for k, v in ref2.config.items()
                 if k in ours2.config_keys()}, (name, second)


def test_a_scheduler_swapped_before_export_is_written_from_memory(published, tmp_path):
    """The folder's file counts only while it still describes the pipeline's scheduler."""
    import diffusers

    from latentrt.export.scheduler_files import in_memory_config, write_scheduler_configs

    p = published("runwayml/stable-diffusion-v1-5")
    assert write_scheduler_configs(p.ref, tmp_path / "a", src=p.folder) == {"scheduler": "source file"}
    swapped = type(p.ref).from_pipe(p.ref, scheduler=diffusers.EulerDiscreteScheduler.from_config(p.ref.scheduler.config))
    assert write_scheduler_configs(swapped, tmp_path / "b", src=p.folder) == {"scheduler": "in-memory config"}
    cfg = json.loads((tmp_path / "b" / "scheduler" / "scheduler_config.json").read_text())
    assert cfg == in_memory_config(swapped.scheduler) and "timestep_spacing" not in cfg
    ours = get_scheduler(cfg)
    assert ours.name == "EulerDiscreteScheduler" and ours.timestep_spacing == swapped.scheduler.config.timestep_spacing


def test_unclip_prior_with_karlos_scheduler_as_diffusers_docs_build_it(tmp_path):
    """StableUnCLIPPipeline as diffusers' docs assemble it: karlo's UnCLIPScheduler file turned into a
    DDPMScheduler with from_config. Exported from memory, the prior's config keeps only the file's
    keys, so the runtime's prior runs DDPM's default (linear) betas as diffusers' does."""
    from diffusers import DDPMScheduler, UnCLIPScheduler

    from latentrt.export.bundle import export_bundle
    from latentrt.export.tiny_unclip import tiny_unclip_pipeline

    karlo = json.loads(published_files("kakaobrain/karlo-v1-alpha")["prior_scheduler/scheduler_config.json"]
                       .read_text())
    ref = tiny_unclip_pipeline(0)
    ref.prior_scheduler = DDPMScheduler.from_config(UnCLIPScheduler.from_config(karlo).config)
    ref.set_progress_bar_config(disable=True)
    m = export_bundle(None, tmp_path / "b", pipe=ref, check="off", trace_size=32, progress=lambda *_: None)
    assert m.extra["scheduler_configs"]["prior_scheduler"] == "in-memory config"
    ours = latentrt.load(tmp_path / "b")
    assert ours.prior_scheduler.beta_schedule == "linear"
    kw = dict(prompt=PROMPT, height=32, width=32, num_inference_steps=2, prior_num_inference_steps=3,
              guidance_scale=5.0, noise_level=20)
    want = ref(**kw, generator=torch.Generator().manual_seed(2), output_type="np").images
    got = ours(**kw, generator=TorchGeneratorNoise(2), output_type="np").images
    assert float(np.abs(got - want).max()) <= TOL and float(want.std()) > 1e-2
