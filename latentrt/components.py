"""I/O declarations of every exportable component, written once (see :mod:`latentrt.spec`).

These functions are pure (no torch): export uses them to trace and to name dynamic axes, profiles
use them to derive TensorRT shapes, and the manifest stores their output so the runtime can check
its inputs without knowing how a component was made. Sizes: ``B`` batch, ``H``/``W`` image pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import TensorSpec


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict:
        return {"inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs]}

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "ComponentSpec":
        return cls(
            name,
            tuple(TensorSpec.from_dict(s) for s in d["inputs"]),
            tuple(TensorSpec.from_dict(s) for s in d["outputs"]),
        )

    def with_float_dtype(self, dtype: str, keep: tuple[str, ...] = ()) -> "ComponentSpec":
        """The same spec with every float tensor (except those named in ``keep``) in ``dtype``."""

        def conv(s: TensorSpec) -> TensorSpec:
            return s.with_dtype(dtype) if s.dtype.startswith("float") and s.name not in keep else s

        return ComponentSpec(self.name, tuple(map(conv, self.inputs)), tuple(map(conv, self.outputs)))


def text_encoder_spec(*, seq_len: int, hidden_size: int, num_layers: int, name: str = "text_encoder") -> ComponentSpec:
    """CLIP text encoder. ``normed_hidden_states`` stacks the final layer norm of every hidden state
    (embeddings first), which is what ``clip_skip`` selects from."""
    f = "float32"
    return ComponentSpec(
        name,
        (TensorSpec("input_ids", "int64", ("B", seq_len)),),
        (
            TensorSpec("last_hidden_state", f, ("B", seq_len, hidden_size)),
            TensorSpec("pooler_output", f, ("B", hidden_size)),
            TensorSpec("normed_hidden_states", f, (num_layers + 1, "B", seq_len, hidden_size)),
        ),
    )


def unet_spec(
    *,
    in_channels: int,
    out_channels: int,
    vae_scale_factor: int,
    seq_len: int,
    cross_attention_dim: int,
    time_cond_proj_dim: int | None = None,
    class_embed_dim: int | None = None,
    name: str = "unet",
) -> ComponentSpec:
    """UNet2DConditionModel. ``timestep`` is float32 (B,) whatever the precision: Euler-family
    timesteps are fractional and fp16 would round them."""
    f, h, w = "float32", f"H/{vae_scale_factor}", f"W/{vae_scale_factor}"
    inputs = [
        TensorSpec("sample", f, ("B", in_channels, h, w)),
        TensorSpec("timestep", "float32", ("B",)),
        TensorSpec("encoder_hidden_states", f, ("B", seq_len, cross_attention_dim)),
    ]
    if time_cond_proj_dim:
        inputs.append(TensorSpec("timestep_cond", f, ("B", time_cond_proj_dim)))
    if class_embed_dim:
        inputs.append(TensorSpec("class_labels", f, ("B", class_embed_dim)))
    return ComponentSpec(name, tuple(inputs), (TensorSpec("out_sample", f, ("B", out_channels, h, w)),))


def vae_encoder_spec(*, in_channels: int, latent_channels: int, vae_scale_factor: int) -> ComponentSpec:
    """Image in [-1, 1] -> the latent distribution's parameters (mean and logvar, concatenated on
    channels); the runtime samples from it so that the draw goes through the randomness contract."""
    f = "float32"
    s = vae_scale_factor
    return ComponentSpec(
        "vae_encoder",
        (TensorSpec("sample", f, ("B", in_channels, "H", "W")),),
        (TensorSpec("latent_parameters", f, ("B", 2 * latent_channels, f"H/{s}", f"W/{s}")),),
    )


def vae_decoder_spec(*, out_channels: int, latent_channels: int, vae_scale_factor: int) -> ComponentSpec:
    f = "float32"
    s = vae_scale_factor
    return ComponentSpec(
        "vae_decoder",
        (TensorSpec("latent_sample", f, ("B", latent_channels, f"H/{s}", f"W/{s}")),),
        (TensorSpec("sample", f, ("B", out_channels, "H", "W")),),
    )


def tiny_vae_decoder_spec(*, out_channels: int, latent_channels: int, vae_scale_factor: int) -> ComponentSpec:
    """TAESD (diffusers ``AutoencoderTiny``) decoder, an alternative to ``vae_decoder``: the same I/O
    (latents divided by the tiny VAE's scaling factor in, an image in [-1, 1] out)."""
    spec = vae_decoder_spec(out_channels=out_channels, latent_channels=latent_channels, vae_scale_factor=vae_scale_factor)
    return ComponentSpec("tiny_vae_decoder", spec.inputs, spec.outputs)


def tiny_vae_encoder_spec(*, in_channels: int, latent_channels: int, vae_scale_factor: int) -> ComponentSpec:
    """TAESD encoder: image in [-1, 1] -> latents directly (no distribution, so no random draw)."""
    f = "float32"
    s = vae_scale_factor
    return ComponentSpec(
        "tiny_vae_encoder",
        (TensorSpec("sample", f, ("B", in_channels, "H", "W")),),
        (TensorSpec("latents", f, ("B", latent_channels, f"H/{s}", f"W/{s}")),),
    )


# -- latent x2 upscaler (StableDiffusionLatentUpscalePipeline) -------------------------------------
# One set of size symbols for every upscaler component: ``H``/``W`` are the *input* image's pixels
# (what a shape profile names), so the UNet runs at the output latents ``H/4`` (= 2*H/8) and the
# decoder returns ``2*H`` x ``2*W`` pixels. The VAE encoder keeps :func:`vae_encoder_spec`.


def text_encoder_prenorm_spec(*, seq_len: int, hidden_size: int, num_layers: int,
                              name: str = "text_encoder") -> ComponentSpec:
    """:func:`text_encoder_spec` plus ``last_hidden_state_prenorm``: the last encoder layer's output
    *before* the final layer norm (``hidden_states[-1]``), which is what the latent upscaler's UNet
    cross-attends to."""
    base = text_encoder_spec(seq_len=seq_len, hidden_size=hidden_size, num_layers=num_layers, name=name)
    extra = TensorSpec("last_hidden_state_prenorm", "float32", ("B", seq_len, hidden_size))
    return ComponentSpec(name, base.inputs, base.outputs + (extra,))


def upscaler_unet_spec(*, in_channels: int, out_channels: int, vae_scale_factor: int, seq_len: int,
                       cross_attention_dim: int, time_cond_proj_dim: int) -> ComponentSpec:
    """The upscaler's K-UNet at the *output* latent size: ``sample`` = noisy latents concatenated with
    the nearest-upsampled low-res latents (``in_channels`` = 2 x latent channels), ``timestep`` =
    log(sigma)/4, ``timestep_cond`` = [noise-level embedding (128), text pooler output]."""
    return unet_spec(in_channels=in_channels, out_channels=out_channels, vae_scale_factor=vae_scale_factor // 2,
                     seq_len=seq_len, cross_attention_dim=cross_attention_dim, time_cond_proj_dim=time_cond_proj_dim)


def upscaler_vae_decoder_spec(*, out_channels: int, latent_channels: int, vae_scale_factor: int) -> ComponentSpec:
    """The VAE decoder at the upscaler's output: latents ``H/4`` -> pixels ``2*H`` (``H`` = input pixels)."""
    f = "float32"
    s = vae_scale_factor // 2
    return ComponentSpec(
        "vae_decoder",
        (TensorSpec("latent_sample", f, ("B", latent_channels, f"H/{s}", f"W/{s}")),),
        (TensorSpec("sample", f, ("B", out_channels, "2*H", "2*W")),),
    )


# -- SDXL (StableDiffusionXLPipeline): two text encoders, pooled text embedding, add_time_ids ------


def sdxl_text_encoder_spec(*, seq_len: int, hidden_size: int, num_layers: int, projection_dim: int | None = None,
                           name: str = "text_encoder") -> ComponentSpec:
    """An SDXL text encoder. ``hidden_states`` stacks the *un-normed* hidden states of the embeddings
    and every layer but the last (``hidden_states[:-1]``): SDXL reads ``hidden_states[-(clip_skip + 2)]``
    (the penultimate layer by default), i.e. ``stack[-(clip_skip + 1)]``, and never the last layer.
    With ``projection_dim`` (CLIPTextModelWithProjection, the second encoder) it also returns
    ``text_embeds``: the projected pooled output SDXL conditions on."""
    f = "float32"
    outputs = [TensorSpec("hidden_states", f, (num_layers, "B", seq_len, hidden_size))]
    if projection_dim:
        outputs.append(TensorSpec("text_embeds", f, ("B", projection_dim)))
    return ComponentSpec(name, (TensorSpec("input_ids", "int64", ("B", seq_len)),), tuple(outputs))


def sdxl_unet_spec(*, in_channels: int, out_channels: int, vae_scale_factor: int, seq_len: int,
                   cross_attention_dim: int, text_embeds_dim: int, time_ids_dim: int,
                   time_cond_proj_dim: int | None = None, name: str = "unet") -> ComponentSpec:
    """The SDXL UNet (``addition_embed_type="text_time"``): :func:`unet_spec` plus the added
    conditioning ``text_embeds`` (pooled, projected text of encoder 2) and ``time_ids`` (original
    size, crop top-left, target size or aesthetic score; float32 whatever the precision)."""
    base = unet_spec(in_channels=in_channels, out_channels=out_channels, vae_scale_factor=vae_scale_factor,
                     seq_len=seq_len, cross_attention_dim=cross_attention_dim, name=name)
    f = "float32"
    extra = [TensorSpec("text_embeds", f, ("B", text_embeds_dim)), TensorSpec("time_ids", "float32", ("B", time_ids_dim))]
    if time_cond_proj_dim:
        extra.append(TensorSpec("timestep_cond", f, ("B", time_cond_proj_dim)))
    return ComponentSpec(name, base.inputs + tuple(extra), base.outputs)


# -- Stable unCLIP (StableUnCLIPPipeline / StableUnCLIPImg2ImgPipeline) ------------------------------


def prior_text_encoder_spec(*, seq_len: int, hidden_size: int, projection_dim: int,
                            name: str = "prior_text_encoder") -> ComponentSpec:
    """CLIPTextModelWithProjection: the projected text embedding (the prior's ``proj_embedding``)
    and the last hidden state (its ``encoder_hidden_states``)."""
    f = "float32"
    return ComponentSpec(
        name,
        (TensorSpec("input_ids", "int64", ("B", seq_len)),),
        (TensorSpec("text_embeds", f, ("B", projection_dim)),
         TensorSpec("last_hidden_state", f, ("B", seq_len, hidden_size))),
    )


def prior_spec(*, embedding_dim: int, proj_dim: int, seq_len: int, hidden_size: int,
               name: str = "prior") -> ComponentSpec:
    """PriorTransformer: noisy image embedding + int64 timestep + text conditioning (and the text's
    attention mask, True on real tokens) -> the predicted image embedding."""
    f = "float32"
    return ComponentSpec(
        name,
        (
            TensorSpec("hidden_states", f, ("B", embedding_dim)),
            TensorSpec("timestep", "int64", ("B",)),
            TensorSpec("proj_embedding", f, ("B", proj_dim)),
            TensorSpec("encoder_hidden_states", f, ("B", seq_len, hidden_size)),
            TensorSpec("attention_mask", "bool", ("B", seq_len)),
        ),
        (TensorSpec("predicted_image_embedding", f, ("B", embedding_dim)),),
    )


def image_encoder_spec(*, image_size: tuple[int, int], embedding_dim: int,
                       name: str = "image_encoder") -> ComponentSpec:
    """CLIPVisionModelWithProjection: CLIP-preprocessed pixels (fixed crop size) -> image_embeds."""
    f = "float32"
    return ComponentSpec(
        name,
        (TensorSpec("pixel_values", f, ("B", 3, int(image_size[0]), int(image_size[1]))),),
        (TensorSpec("image_embeds", f, ("B", embedding_dim)),),
    )


# -- conditioning (ControlNet, T2I-Adapter): residuals the UNet adds at fixed places -----------------
# A residual's spatial dims are ``H/k`` for its downsampling ``k`` (pixels per latent-or-feature
# pixel), so one declaration serves every image size.

MID_RESIDUAL = "mid_block_res"


def down_residual_names(n: int) -> list[str]:
    """The ControlNet outputs / UNet inputs added to the UNet's skip connections, in diffusers' order
    (``down_block_additional_residuals``)."""
    return [f"down_block_res_{i}" for i in range(n)]


def adapter_feature_names(n: int) -> list[str]:
    """The T2I-Adapter outputs / UNet inputs ``down_intrablock_additional_residuals``, in order."""
    return [f"adapter_feature_{i}" for i in range(n)]


def unet_down_residual_shapes(*, block_out_channels, layers_per_block, vae_scale_factor: int,
                              down_block_count: int | None = None) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(channels, downsampling) of every down-block residual of a UNet2DConditionModel / ControlNetModel
    (``conv_in``'s output, each resnet's, each downsampler's) and of the mid block's output."""
    blocks = list(block_out_channels)
    lpb = [layers_per_block] * len(blocks) if isinstance(layers_per_block, int) else list(layers_per_block)
    f = int(vae_scale_factor)
    shapes = [(int(blocks[0]), f)]
    for i, c in enumerate(blocks):
        shapes += [(int(c), f)] * int(lpb[i])
        if i < len(blocks) - 1:
            f *= 2
            shapes.append((int(c), f))
    return shapes, (int(blocks[-1]), f)


def residual_specs(names, shapes) -> tuple[TensorSpec, ...]:
    """float32 ``(B, C, H/k, W/k)`` specs for ``names`` and their (channels, k)."""
    return tuple(TensorSpec(n, "float32", ("B", c, f"H/{k}", f"W/{k}")) for n, (c, k) in zip(names, shapes))


def controlnet_spec(unet: ComponentSpec, *, cond_channels: int, down_shapes, mid_shape,
                    name: str = "controlnet_0") -> ComponentSpec:
    """ControlNetModel with the I/O its pipeline uses: the UNet's ``sample``, ``timestep`` and
    ``encoder_hidden_states`` (+ SDXL's ``text_embeds`` and ``time_ids``; never ``timestep_cond``,
    which diffusers does not pass it), the control image in [0, 1] -> the residuals at scale 1."""
    take = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
    inputs = [s for s in unet.inputs if s.name in take]
    inputs.insert(3, TensorSpec("controlnet_cond", "float32", ("B", int(cond_channels), "H", "W")))
    outputs = residual_specs(down_residual_names(len(down_shapes)), down_shapes) + \
        residual_specs([MID_RESIDUAL], [mid_shape])
    return ComponentSpec(name, tuple(inputs), outputs)


def adapter_spec(*, in_channels: int, feature_shapes, name: str = "adapter") -> ComponentSpec:
    """T2IAdapter: the adapter image in [0, 1] (its own channel count: 1 for sketches and edges, 3 for
    colour) -> its features, unscaled."""
    return ComponentSpec(name, (TensorSpec("image", "float32", ("B", int(in_channels), "H", "W")),),
                         residual_specs(adapter_feature_names(len(feature_shapes)), feature_shapes))


def with_residual_inputs(unet: ComponentSpec, residuals: tuple[TensorSpec, ...], name: str) -> ComponentSpec:
    """A UNet spec that also takes ``residuals`` (a ControlNet's outputs or an adapter's features)."""
    return ComponentSpec(name, unet.inputs + tuple(residuals), unet.outputs)
