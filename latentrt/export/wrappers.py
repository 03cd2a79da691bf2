"""torch modules that expose each diffusers/transformers component with the I/O of its spec.

Each wrapper's ``forward`` takes the spec's inputs in order and returns its outputs in order.
"""

from __future__ import annotations

import torch


class TextEncoderWrapper(torch.nn.Module):
    """CLIPTextModel -> last_hidden_state, pooler_output, normed_hidden_states (for clip_skip)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm  # transformers 4 | 5
        normed = torch.stack([norm(h) for h in out.hidden_states], dim=0)
        return out.last_hidden_state, out.pooler_output, normed


class UNetWrapper(torch.nn.Module):
    """UNet2DConditionModel with a float32 (B,) timestep and the optional conditioning inputs the
    spec names (``timestep_cond`` for LCMs, ``class_labels`` for unCLIP)."""

    def __init__(self, unet, input_names):
        super().__init__()
        self.unet = unet
        self.input_names = tuple(input_names)

    def forward(self, *args):
        kw = dict(zip(self.input_names, args))
        extra = {k: kw[k] for k in ("timestep_cond", "class_labels") if k in kw}
        return self.unet(kw["sample"], kw["timestep"], kw["encoder_hidden_states"], return_dict=False, **extra)[0]


class VaeEncoderWrapper(torch.nn.Module):
    """AutoencoderKL image -> latent distribution parameters (mean, logvar on channels)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        h = self.vae.encoder(sample)
        if getattr(self.vae, "quant_conv", None) is not None:
            h = self.vae.quant_conv(h)
        return h


class VaeDecoderWrapper(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]
