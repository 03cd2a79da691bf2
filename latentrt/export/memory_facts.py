"""What the runtime's memory estimate needs to know about a component (:mod:`latentrt.runtime.limits`).

Recorded at export in the component's manifest entry as ``extra["memory"]``:
``{"input": NAME, "levels": [[scale, channels, heads], ...]}``: for each resolution level of the
network, its spatial scale relative to the input tensor ``NAME`` (NCHW), its channel count and the
number of self-attention heads at that level (0: none). Read from the diffusers configs; components
without spatial levels (text encoders, the unCLIP prior) get no record (their inputs and outputs
bound their memory).
"""

from __future__ import annotations


def _heads(cfg, i: int) -> int:
    """diffusers' rule: ``num_attention_heads or attention_head_dim`` (the latter is the head count
    in SD1.x/2.x configs, a historical misnaming), per level when a list."""
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "attention_head_dim", None) or 8
    return int(heads[i] if isinstance(heads, (list, tuple)) else heads)


def _unet(unet) -> dict:
    cfg = unet.config
    levels = [[0.5 ** i, int(ch), _heads(cfg, i) if "Attn" in kind or "Attention" in kind else 0]
              for i, (kind, ch) in enumerate(zip(cfg.down_block_types, cfg.block_out_channels))]
    return {"input": "sample", "levels": levels}


def _vae(vae, decoder: bool) -> dict | None:
    cfg = vae.config
    if hasattr(cfg, "decoder_block_out_channels"):  # AutoencoderTiny (TAESD): no attention
        channels = list(cfg.decoder_block_out_channels if decoder else cfg.encoder_block_out_channels)
        attention = False
    elif hasattr(cfg, "block_out_channels"):
        channels = list(cfg.block_out_channels)
        attention = bool(getattr(cfg, "mid_block_add_attention", True))
    else:
        return None
    n = len(channels)
    if decoder:  # from the latents up: the widest level first, the mid block's attention on the latents
        levels = [[2.0 ** i, int(ch), 1 if attention and i == 0 else 0] for i, ch in enumerate(reversed(channels))]
        return {"input": "latent_sample", "levels": levels}
    levels = [[0.5 ** i, int(ch), 1 if attention and i == n - 1 else 0] for i, ch in enumerate(channels)]
    return {"input": "sample", "levels": levels}


def memory_facts(module, spec) -> dict | None:
    """The ``extra["memory"]`` record of a component exported from ``module`` (a recipe's wrapper)."""
    unet = getattr(module, "unet", None)
    if unet is not None and hasattr(getattr(unet, "config", None), "down_block_types"):
        return _unet(unet)
    vae = getattr(module, "vae", None)
    if vae is not None and getattr(vae, "config", None) is not None:
        names = {s.name for s in spec.inputs}
        if "latent_sample" in names:
            return _vae(vae, decoder=True)
        if "sample" in names:
            return _vae(vae, decoder=False)
    return None
