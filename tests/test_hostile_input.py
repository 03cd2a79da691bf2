"""Hostile input, tried systematically (hypothesis): every pipeline's call arguments and images.

Each case gets a clear error (a ValueError / TypeError, with a message, raised by latentrt's own
code, not from inside numpy, PIL or an engine) or a correct image; never an engine traceback, a
hang or a crash. Runs a bounded number of examples with a fixed seed (``derandomize=True``), on tiny
bundles at tiny sizes with one step; ``LATENTRT_HYPOTHESIS_EXAMPLES`` sets the number per test.

The calls run under a memory budget (``$LATENTRT_MEMORY_LIMIT``, as a server would set), so huge
batches and sizes are refused by the memory estimate instead of running for minutes.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import signal
import struct
import traceback
import warnings
import zlib

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import latentrt  # noqa: E402
from latentrt.runtime import limits  # noqa: E402

EXAMPLES = int(os.environ.get("LATENTRT_HYPOTHESIS_EXAMPLES", "30"))
SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)
HANG_SECONDS = 60
#: Python's own messages: raised in latentrt's code, but naming no argument and no fix
GENERIC = ("unhashable type", "object is not callable", "not supported between instances", "unsupported operand",
           "object is not iterable", "is not subscriptable", "can't multiply sequence", "invalid literal for int()",
           "could not convert string to float", "cannot be interpreted as an integer", "has no len()",
           "must be real number", "object has no attribute", "cannot convert float", "truth value of an array")
TRIED: dict[str, dict[str, int]] = {}  # test -> outcome -> count (printed at the end, for the record)


# -- the pipelines ----------------------------------------------------------------------------------
def _export(make, root):
    from latentrt.export.bundle import export_bundle

    src = make(root / "src")
    export_bundle(src, root / "bundle", check="off", progress=lambda *_: None)
    return root / "bundle"


def _makers():
    from latentrt.export import tiny, tiny_unclip

    return {
        "sd": tiny.save_tiny_sd,
        "sdxl": tiny.save_tiny_sdxl,
        "unclip": tiny_unclip.save_tiny_unclip,
        "unclip_img2img": lambda p: tiny_unclip.save_tiny_unclip(p, img2img=True),
        "latent_upscale": tiny.save_tiny_upscaler,
    }


KINDS = ["lcm", "sd", "sdxl", "unclip", "unclip_img2img", "latent_upscale"]
#: kinds whose call takes an image (image-to-image, variations, upscaling)
IMAGE_KINDS = ["lcm", "sd", "sdxl", "unclip_img2img", "latent_upscale"]


@pytest.fixture(scope="module")
def pipes(lcm_bundle, tmp_path_factory):
    built = {"lcm": latentrt.load(lcm_bundle)}
    return built, tmp_path_factory


def _pipe(pipes, kind):
    built, factory = pipes
    if kind not in built:
        built[kind] = latentrt.load(_export(_makers()[kind], factory.mktemp(kind)))
    return built[kind]


@pytest.fixture(scope="module", autouse=True)
def _record():
    """Print how many cases each property test tried and how they ended (shown with ``pytest -s``)."""
    yield
    for test, counts in sorted(TRIED.items()):
        print(f"{test}: {sum(counts.values())} cases, " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))


@pytest.fixture(autouse=True)
def _memory_budget(monkeypatch):
    monkeypatch.setenv(limits.ENV_LIMIT, "1G")


def _photo(h=64, w=64, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _base_kwargs(pipe, kind) -> dict:
    """A valid, cheap call: tiny size, one step, numpy output."""
    m = int(pipe.constants.get("size_multiple", 8))
    side = max(m, 32) if kind != "latent_upscale" else 64  # the upscaler takes inputs of 64 px and more
    kw = {"prompt": "a cat", "num_inference_steps": 1, "output_type": "np", "generator": 0}
    params = inspect.signature(pipe.__call__).parameters
    if "height" in params and kind not in IMAGE_KINDS[4:]:
        kw.update(height=side, width=side)
    if "prior_num_inference_steps" in params:
        kw["prior_num_inference_steps"] = 1
    if kind in ("unclip_img2img", "latent_upscale"):
        kw["image"] = _photo(side, side)
    return kw


# -- what counts as a clear outcome -----------------------------------------------------------------
@contextlib.contextmanager
def _no_hang(seconds=HANG_SECONDS):
    def alarm(*_):
        raise TimeoutError(f"the call did not finish in {seconds}s (a hang)")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _outcome(test: str, pipe, kwargs) -> str:
    """Run the call; pass on a correct image or a clear error, fail on anything else."""
    counts = TRIED.setdefault(test, {})
    try:
        with _no_hang():
            out = pipe(**kwargs)
    except (ValueError, TypeError) as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        assert "/latentrt/" in frame.filename.replace(os.sep, "/"), (
            f"{type(e).__name__} raised from {frame.filename}:{frame.lineno}, not by latentrt: {e}")
        assert str(e).strip(), f"{type(e).__name__} without a message"
        assert not any(g in str(e) for g in GENERIC), f"Python's generic message, not latentrt's: {type(e).__name__}: {e}"
        counts["clear error"] = counts.get("clear error", 0) + 1
        if os.environ.get("LATENTRT_HYPOTHESIS_VERBOSE"):
            print(f"  {test}: {type(e).__name__}: {str(e)[:150]}")
        return "error"
    images = out.images
    kind = kwargs.get("output_type", "pil")
    if kind == "np":
        assert isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] == 3
        assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    elif kind == "latent":
        assert isinstance(images, np.ndarray) and images.ndim == 4
    else:
        assert images and all(i.mode == "RGB" for i in images)
    counts["image"] = counts.get("image", 0) + 1
    return "image"


# -- hostile values -----------------------------------------------------------------------------------
LONG = "a very long prompt " * 527  # 10,013 characters
junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.binary(max_size=8), st.lists(st.integers(-3, 3), max_size=3),
    st.sampled_from([{"a": 1}, (), [None], np.float32("nan"), np.int64(-1), np.zeros((2, 3), np.float32),
                     np.full((1, 4, 4, 4), np.nan, np.float32), np.array(["x"]), object()]),
)
prompt_values = st.one_of(
    st.text(max_size=40), st.just(""), st.just(LONG), st.binary(max_size=16), st.just("\udcff\udc80 surrogates"),
    st.just("caf\u00e9 \u732b \U0001F431 \x00 nul"), st.lists(st.text(max_size=8), min_size=0, max_size=3),
    st.just(["a cat", 3]), junk,
)
number_values = st.one_of(st.sampled_from([0, -1, 1, 2, 1.5, -0.0, 1e308, -1e308, 10 ** 9, 2 ** 63]),
                          st.floats(allow_nan=True, allow_infinity=True), junk)
SPECIAL = {
    "prompt": prompt_values, "negative_prompt": prompt_values, "prompt_2": prompt_values,
    "negative_prompt_2": prompt_values,
    "height": st.one_of(st.sampled_from([None, 0, -64, 63, 65, 8, 4096, 10 ** 9, 64.0, "64", float("nan")]), junk),
    "width": st.one_of(st.sampled_from([None, 0, -64, 63, 65, 8, 4096, 10 ** 9, 64.0, "64", float("nan")]), junk),
    "num_images_per_prompt": st.one_of(st.sampled_from([1, 2, 0, -1, 10 ** 4, 10 ** 9, 2.0, "2", True]), junk),
    "num_inference_steps": st.one_of(st.sampled_from([1, 2, 0, -1, 10 ** 9, 1.5, "1", True, 1001]), junk),
    "prior_num_inference_steps": st.one_of(st.sampled_from([1, 0, -1, 10 ** 9, 1.5]), junk),
    "output_type": st.one_of(st.sampled_from(["np", "pil", "latent", "pt", "", "NP"]), junk),
    "scheduler": st.one_of(st.sampled_from(["EulerDiscreteScheduler", "DDIMScheduler", "NoSuchScheduler", ""]), junk),
    "vae": st.one_of(st.sampled_from(["full", "tiny", "huge"]), junk),
}
SKIPPED = {"self", "callback", "callback_on_step_end"}  # code, not data


def _strategy(name):
    return SPECIAL.get(name, number_values)


def call_arguments(pipe, kind):
    """One to three arguments replaced per case (with more, the first checked one hides the others)."""
    params = [p for p in inspect.signature(pipe.__call__).parameters if p not in SKIPPED]
    keys = st.lists(st.sampled_from(params), min_size=1, max_size=3, unique=True)
    return keys.flatmap(lambda ks: st.fixed_dictionaries({k: _strategy(k) for k in ks}))


@pytest.mark.parametrize("kind", KINDS)
def test_call_arguments(pipes, kind):
    pipe = _pipe(pipes, kind)
    base = _base_kwargs(pipe, kind)
    assert _outcome(f"arguments[{kind}]", pipe, base) == "image"  # the control call works

    @SETTINGS
    @given(call_arguments(pipe, kind))
    def run(overrides):
        _outcome(f"arguments[{kind}]", pipe, {**base, **overrides})

    run()


@pytest.mark.parametrize("kind", ["lcm", "sd"])
def test_mismatched_lists(pipes, kind):
    pipe = _pipe(pipes, kind)
    base = _base_kwargs(pipe, kind)

    @SETTINGS
    @given(st.lists(st.text(max_size=6), min_size=1, max_size=3), st.lists(st.text(max_size=6), min_size=0, max_size=4),
           st.integers(1, 2))
    def run(prompts, negatives, n):
        _outcome(f"lists[{kind}]", pipe, {**base, "prompt": prompts, "negative_prompt": negatives,
                                          "num_images_per_prompt": n, "guidance_scale": 3.0})

    run()


@pytest.mark.parametrize("prompt", ["", LONG, "caf\u00e9 \u732b \U0001F431 \x00 nul", "\udcff\udc80 surrogates",
                                    b"\xff\xfe bytes", ["a", b"b"], [], ["a", None]])
def test_prompt_values(pipes, prompt):
    """The prompt values the property test draws from, each tried once."""
    pipe = _pipe(pipes, "lcm")
    _outcome("prompts[lcm]", pipe, {**_base_kwargs(pipe, "lcm"), "prompt": prompt})


def test_long_prompt_is_truncated_with_a_warning(pipes, caplog):
    pipe = _pipe(pipes, "lcm")
    with caplog.at_level(logging.WARNING, logger="latentrt"):
        out = pipe(**{**_base_kwargs(pipe, "lcm"), "prompt": LONG})
    assert out.images.shape[0] == 1
    assert any("prompt truncated to 77 CLIP tokens" in r.getMessage() for r in caplog.records)


# -- hostile images --------------------------------------------------------------------------------
def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, with no pixel data (opens lazily, fails on decode)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _encoded(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif_rotated_jpeg(w=48, h=32) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise on display
    return _encoded(_photo(h, w), "JPEG", exif=exif.tobytes())


@st.composite
def pil_images(draw):
    from PIL import Image

    kind = draw(st.sampled_from(["mode", "mode", "truncated", "bomb", "tiny", "exif"]))
    if kind == "bomb":  # 100 megapixels, as claimed by the header (nothing is decoded)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(_png_header_only(10_000, 10_000)))
    if kind == "tiny":
        side = draw(st.integers(1, 9))
        return Image.new(draw(st.sampled_from(["RGB", "L", "1"])), (side, draw(st.integers(1, 9))))
    if kind == "exif":
        return Image.open(io.BytesIO(_exif_rotated_jpeg()))
    h, w = (draw(st.one_of(st.integers(1, 6).map(lambda k: 16 * k), st.integers(8, 100))) for _ in "hw")
    rgb = _photo(h, w, draw(st.integers(0, 3)))
    mode = draw(st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "I;16", "I", "F", "HSV",
                                 "LAB"]))
    if mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)  # mode I;16
    elif mode == "F":
        img = Image.fromarray(np.asarray(rgb.convert("L"), np.float32) / draw(st.sampled_from([255.0, 1.0])))
    elif mode == "PA":
        img = rgb.convert("P").convert("PA")
    elif mode == "LAB":
        img = Image.new("LAB", (w, h))
    else:
        img = rgb.convert(mode)
    if kind == "truncated":
        fmt = draw(st.sampled_from(["PNG", "JPEG"]))
        data = _encoded(_photo(64, 64), fmt)  # big enough that half of it keeps the header
        return Image.open(io.BytesIO(data[: draw(st.integers(len(data) // 2, len(data) - 1))]))  # header kept
    return img


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_images(pipes, kind):
    pipe = _pipe(pipes, kind)
    base = _base_kwargs(pipe, kind)
    base.pop("height", None), base.pop("width", None)
    if "strength" in inspect.signature(pipe.__call__).parameters:
        base["strength"] = 1.0  # one step of one: lower strengths leave no step at all

    @SETTINGS
    @given(pil_images())
    def run(image):
        _outcome(f"images[{kind}]", pipe, {**base, "image": image})

    run()


@pytest.mark.parametrize("name", ["passwd", "truncated.png", "truncated.jpg", "bomb.png", "exif.jpg", "16bit.png"])
def test_load_image_files(tmp_path, name):
    """What the CLI's --image reads (latentrt.runtime.image.load_image)."""
    from PIL import Image

    from latentrt.runtime.image import ImageInputError, load_image

    path = tmp_path / name
    full_png, full_jpg = _encoded(_photo(), "PNG"), _encoded(_photo(), "JPEG")
    path.write_bytes({"passwd": b"root:x:0:0:root:/root:/bin/bash\n", "truncated.png": full_png[: len(full_png) // 2],
                      "truncated.jpg": full_jpg[: len(full_jpg) // 2], "bomb.png": _png_header_only(10_000, 10_000),
                      "exif.jpg": _exif_rotated_jpeg(48, 32),
                      "16bit.png": _encoded(Image.fromarray(np.full((16, 24), 65535, np.uint16)), "PNG")}
                     [name])
    if name == "exif.jpg":
        assert load_image(path).size == (32, 48)  # EXIF orientation applied, as diffusers' load_image does
    elif name == "16bit.png":
        img = load_image(path)
        from latentrt.runtime.image import to_nchw

        assert img.size == (24, 16) and float(to_nchw(img).min()) == 1.0  # white stays white (not clipped)
    else:
        with pytest.raises(ImageInputError, match={"passwd": "not a readable image", "bomb.png": "decompression bomb",
                                                   "truncated.png": "could not be decoded",
                                                   "truncated.jpg": "could not be decoded"}[name]):
            load_image(path)


@pytest.mark.parametrize("extra, message", [
    (["--image", "/etc/passwd"], "error: /etc/passwd: not a readable image (UnidentifiedImageError"),
    (["--steps", "0"], "error: --steps must be a positive number of denoising steps; got 0"),
])
def test_cli_bad_input_is_one_line_before_any_progress_bar(lcm_bundle, tmp_path, extra, message):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "latentrt.cli", "generate", str(lcm_bundle), "a cat", "-o",
                        str(tmp_path / "out"), *extra], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert r.returncode == 2 and r.stderr.startswith(message), r.stderr
    assert "Traceback" not in r.stderr and "step/s" not in r.stderr  # no progress bar was drawn
