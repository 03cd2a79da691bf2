"""torch modules that expose each diffusers/transformers component with the I/O of its spec.

Each wrapper's ``forward`` takes the spec's inputs in order and returns its outputs in order.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def explicit_upsample_sizes(unet):
    """Trace the branch of ``UNet2DConditionModel.forward`` that takes every up-block's output size
    from its skip tensor (``upsample_size = down_block_res_samples[-1].shape[2:]``).

    diffusers takes that branch only when a latent side is not a multiple of the UNet's overall
    upsampling factor (``2 ** num_upsamplers``); a graph traced at a divisible size would bake in the
    plain ``scale_factor=2`` upsampling and refuse every other size. With ``num_upsamplers`` set so
    high that no size is divisible, the traced Resize ops read their sizes from the skip tensors'
    shapes, so one dynamic graph serves every latent size diffusers accepts (for divisible sizes the
    result is the same nearest-neighbour x2).
    """
    saved = unet.num_upsamplers
    unet.num_upsamplers = 40  # 2**40: no latent side is a multiple (and it fits the traced int64)
    try:
        yield unet
    finally:
        unet.num_upsamplers = saved


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
        with explicit_upsample_sizes(self.unet):
            return self.unet(kw["sample"], kw["timestep"], kw["encoder_hidden_states"], return_dict=False, **extra,
                             **self.conditioning_kwargs(kw))[0]

    def conditioning_kwargs(self, kw: dict) -> dict:
        """Further UNet keyword arguments from the inputs (ControlNet / adapter residuals: see
        :mod:`latentrt.export.control`); none here."""
        return {}


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


class TinyVaeEncoderWrapper(torch.nn.Module):
    """AutoencoderTiny image in [-1, 1] -> latents (``AutoencoderTiny.encode(x).latents``)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0]


#: AutoencoderTiny latents -> image in [-1, 1]: ``decode`` has AutoencoderKL's signature, and the
#: decoder's own tanh clamp is part of the graph.
TinyVaeDecoderWrapper = VaeDecoderWrapper


class TextEncoderPrenormWrapper(TextEncoderWrapper):
    """:class:`TextEncoderWrapper` plus the last layer's output before the final layer norm
    (``hidden_states[-1]``), which the latent upscaler's UNet uses as ``encoder_hidden_states``."""

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm  # transformers 4 | 5
        normed = torch.stack([norm(h) for h in out.hidden_states], dim=0)
        return out.last_hidden_state, out.pooler_output, normed, out.hidden_states[-1]


class SDXLTextEncoderWrapper(torch.nn.Module):
    """CLIPTextModel / CLIPTextModelWithProjection -> hidden_states (stack of ``hidden_states[:-1]``,
    un-normed, as SDXL reads them) [+ text_embeds, the projected pooled output]."""

    def __init__(self, text_encoder, with_projection: bool):
        super().__init__()
        self.text_encoder = text_encoder
        self.with_projection = with_projection

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        stack = torch.stack(list(out.hidden_states[:-1]), dim=0)
        if self.with_projection:
            return stack, out.text_embeds
        return stack


class SDXLUNetWrapper(torch.nn.Module):
    """SDXL UNet2DConditionModel: ``text_embeds`` and ``time_ids`` go in ``added_cond_kwargs``."""

    def __init__(self, unet, input_names):
        super().__init__()
        self.unet = unet
        self.input_names = tuple(input_names)

    def forward(self, *args):
        kw = dict(zip(self.input_names, args))
        extra = dict(self.conditioning_kwargs(kw))
        # conditioning may add to added_cond_kwargs (the IP-Adapter's image_embeds: export/ip_adapter.py)
        added = {"text_embeds": kw["text_embeds"], "time_ids": kw["time_ids"], **extra.pop("added_cond_kwargs", {})}
        with explicit_upsample_sizes(self.unet):
            return self.unet(kw["sample"], kw["timestep"], kw["encoder_hidden_states"],
                             timestep_cond=kw.get("timestep_cond"), added_cond_kwargs=added, return_dict=False,
                             **extra)[0]

    conditioning_kwargs = UNetWrapper.conditioning_kwargs


class _KResample(torch.nn.Module):
    """Export-friendly ``KDownsample2D`` / ``KUpsample2D`` (the latent upscaler's K-UNet).

    diffusers builds their (channels x channels) diagonal kernel from the input's shape at every
    call, which the ONNX tracer cannot export ("convolution for kernel of unknown shape"). The same
    result comes from one constant (1, 1, k, k) kernel applied to every channel separately: fold the
    channels into the batch, convolve, unfold.
    """

    def __init__(self, orig, transpose: bool):
        super().__init__()
        self.pad_mode = orig.pad_mode
        self.transpose = transpose
        self.pad = (orig.pad + 1) // 2 if transpose else orig.pad
        self.conv_padding = orig.pad * 2 + 1 if transpose else 0
        self.register_buffer("kernel", orig.kernel.detach().clone()[None, None], persistent=False)

    def forward(self, inputs):
        b, c = inputs.shape[0], inputs.shape[1]
        x = torch.nn.functional.pad(inputs, (self.pad,) * 4, self.pad_mode)
        x = x.reshape(-1, 1, x.shape[2], x.shape[3])
        k = self.kernel.to(x)
        if self.transpose:
            y = torch.nn.functional.conv_transpose2d(x, k, stride=2, padding=self.conv_padding)
        else:
            y = torch.nn.functional.conv2d(x, k, stride=2)
        return y.reshape(b, c, y.shape[2], y.shape[3])


def make_k_resamplers_exportable(module: torch.nn.Module) -> torch.nn.Module:
    """Replace, in place, every ``KDownsample2D`` / ``KUpsample2D`` under ``module`` by the
    numerically equivalent :class:`_KResample`; returns ``module``."""
    from diffusers.models.downsampling import KDownsample2D
    from diffusers.models.upsampling import KUpsample2D

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (KDownsample2D, KUpsample2D)):
                setattr(parent, name, _KResample(child, transpose=isinstance(child, KUpsample2D)))
    return module


class PriorTextEncoderWrapper(torch.nn.Module):
    """CLIPTextModelWithProjection -> text_embeds, last_hidden_state (what the unCLIP prior reads)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, return_dict=True)
        return out.text_embeds, out.last_hidden_state


class PriorWrapper(torch.nn.Module):
    """PriorTransformer with a (B,) int64 timestep and a bool attention mask."""

    def __init__(self, prior):
        super().__init__()
        self.prior = prior

    def forward(self, hidden_states, timestep, proj_embedding, encoder_hidden_states, attention_mask):
        return self.prior(hidden_states, timestep=timestep, proj_embedding=proj_embedding,
                          encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                          return_dict=False)[0]


class ImageEncoderWrapper(torch.nn.Module):
    """CLIPVisionModelWithProjection pixel_values -> image_embeds."""

    def __init__(self, image_encoder):
        super().__init__()
        self.image_encoder = image_encoder

    def forward(self, pixel_values):
        return self.image_encoder(pixel_values, return_dict=True).image_embeds
