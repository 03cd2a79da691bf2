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
