"""The full-size SDXL-family benchmark architectures match the published parameter counts
(built on the meta device: no weights, no memory)."""

from __future__ import annotations

import pytest

from latentrt.bench.sdxl_models import SDXL_MODEL_CONFIGS, count_parameters

# stabilityai/stable-diffusion-xl-base-1.0's UNet has 2,567,463,684 parameters; LCM-SDXL adds the
# guidance embedding's bias-free Linear(256, 320); SSD-1B is "1.3B"
UNET_PARAMS = {"sdxl-base": 2_567_463_684, "sdxl-lcm": 2_567_463_684 + 256 * 320, "ssd-1b-lcm": 1_300_277_764}


@pytest.mark.parametrize("name", sorted(UNET_PARAMS))
def test_unet_parameter_counts(name):
    config, _ = SDXL_MODEL_CONFIGS[name]
    assert count_parameters("unet", config) == UNET_PARAMS[name]


def test_registered_as_benchmark_models():
    from latentrt.bench.models import MODELS

    assert {"sdxl-lcm", "sdxl-base", "ssd-1b-lcm"} <= set(MODELS)
