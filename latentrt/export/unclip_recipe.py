"""Export recipes for Stable unCLIP: ``StableUnCLIPPipeline`` ("unclip": text -> prior -> image
embedding -> image) and ``StableUnCLIPImg2ImgPipeline`` ("unclip_img2img": image variations).

Components: the SD text encoder, the UNet with its ``class_labels`` input (the noised image
embedding with the noise-level embedding appended: 2 x the embedding width), the VAE decoder, and
either the prior's CLIP text encoder with projection + the PriorTransformer, or the CLIP vision
encoder with projection. What is not a network goes beside them: the prior's and the noising
scheduler's configs, the prior tokenizer, the CLIP image processor settings, and the embedding
statistics (the image normalizer's mean/std, the prior's clip mean/std) in one ``.npz`` whose
sha256 the manifest records.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import components as C
from ..manifest import sha256_file
from .recipes import ComponentPlan, Recipe, UnsupportedModelError, sd_components, sd_constants
from .wrappers import ImageEncoderWrapper, PriorTextEncoderWrapper, PriorWrapper

STATS_FILE = "image_normalizer/embedding_stats.npz"


def _is(name: str):
    return lambda pipe: type(pipe).__name__ == name


def _crop_size(fe) -> tuple[int, int]:
    crop = fe.crop_size
    if isinstance(crop, int):
        return crop, crop
    get = crop.get if hasattr(crop, "get") else (lambda k: getattr(crop, k))
    return int(get("height")), int(get("width"))


def unclip_constants(pipe) -> dict:
    k = sd_constants(pipe)
    embed_dim = int(pipe.image_normalizer.mean.shape[-1])
    class_dim = pipe.unet.config.projection_class_embeddings_input_dim
    if pipe.unet.config.class_embed_type != "projection" or class_dim != 2 * embed_dim:
        raise UnsupportedModelError(
            f"{type(pipe).__name__}: the UNet must take class_labels through a 'projection' class embedding of "
            f"width 2 x {embed_dim} (image embedding + noise-level embedding); it has class_embed_type="
            f"{pipe.unet.config.class_embed_type!r}, projection_class_embeddings_input_dim={class_dim}"
        )
    k.update(
        image_embed_dim=embed_dim,
        class_embed_dim=int(class_dim),
        noise_level=0,
        noising_num_train_timesteps=int(pipe.image_noising_scheduler.config.num_train_timesteps),
        guidance_scale=10.0,
        num_inference_steps=20,
    )
    if hasattr(pipe, "prior"):
        te, prior, tok = pipe.prior_text_encoder, pipe.prior, pipe.prior_tokenizer
        seq = int(tok.model_max_length)
        if int(prior.config.num_embeddings) != seq:
            raise UnsupportedModelError(f"prior.num_embeddings={prior.config.num_embeddings} != prior tokenizer "
                                        f"max length {seq}")
        k.update(
            prior_seq_len=seq,
            prior_hidden_size=int(te.config.hidden_size),
            prior_projection_dim=int(te.config.projection_dim),
            prior_vocab_size=int(te.config.vocab_size),
            prior_embedding_dim=int(prior.config.embedding_dim),
            prior_proj_dim=int(prior.config.embedding_proj_dim or prior.config.embedding_dim),
            prior_num_inference_steps=25,
            prior_guidance_scale=4.0,
        )
        if k["prior_embedding_dim"] != embed_dim:
            raise UnsupportedModelError(f"the prior predicts {k['prior_embedding_dim']}-wide image embeddings but "
                                        f"the image normalizer has {embed_dim}")
    else:
        h, w = _crop_size(pipe.feature_extractor)
        k.update(clip_image_height=h, clip_image_width=w,
                 image_encoder_projection_dim=int(pipe.image_encoder.config.projection_dim))
        if k["image_encoder_projection_dim"] != embed_dim:
            raise UnsupportedModelError(f"the image encoder gives {k['image_encoder_projection_dim']}-wide "
                                        f"embeddings but the image normalizer has {embed_dim}")
    return k


def unclip_components(pipe, k: dict) -> list[ComponentPlan]:
    plans = [p for p in sd_components(pipe, k, unet_extra={"class_embed_dim": k["class_embed_dim"]})
             if p.spec.name != "vae_encoder"]  # unCLIP never encodes an image into latents
    if hasattr(pipe, "prior"):
        te_spec = C.prior_text_encoder_spec(seq_len=k["prior_seq_len"], hidden_size=k["prior_hidden_size"],
                                            projection_dim=k["prior_projection_dim"])
        prior_spec = C.prior_spec(embedding_dim=k["prior_embedding_dim"], proj_dim=k["prior_proj_dim"],
                                  seq_len=k["prior_seq_len"], hidden_size=k["prior_hidden_size"])
        plans += [
            ComponentPlan(te_spec, PriorTextEncoderWrapper(pipe.prior_text_encoder),
                          {"input_ids": (0, k["prior_vocab_size"])}),
            ComponentPlan(prior_spec, PriorWrapper(pipe.prior), {"timestep": (0, 1000)}),
        ]
    else:
        spec = C.image_encoder_spec(image_size=(k["clip_image_height"], k["clip_image_width"]),
                                    embedding_dim=k["image_embed_dim"])
        plans.append(ComponentPlan(spec, ImageEncoderWrapper(pipe.image_encoder)))
    return plans


def _stat(t) -> np.ndarray:
    return t.detach().float().cpu().numpy().reshape(1, -1).astype(np.float32)


def unclip_support_files(pipe, root: Path) -> dict:
    """Prior tokenizer or CLIP image processor settings, and the embedding statistics (the prior's and
    noising scheduler's configs are written with every scheduler's, by export.scheduler_files)."""
    root = Path(root)
    stats = {"normalizer_mean": _stat(pipe.image_normalizer.mean), "normalizer_std": _stat(pipe.image_normalizer.std)}
    if hasattr(pipe, "prior"):
        pipe.prior_tokenizer.save_pretrained(str(root / "prior_tokenizer"))
        stats.update(prior_clip_mean=_stat(pipe.prior.clip_mean), prior_clip_std=_stat(pipe.prior.clip_std))
    else:
        pipe.feature_extractor.save_pretrained(str(root / "feature_extractor"))
    path = root / STATS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **stats)
    return {"unclip": {"embedding_stats": {"path": STATS_FILE, "sha256": sha256_file(path),
                                           "arrays": sorted(stats)}}}


UNCLIP = Recipe("unclip", _is("StableUnCLIPPipeline"), unclip_constants, unclip_components, unclip_support_files)
UNCLIP_IMG2IMG = Recipe("unclip_img2img", _is("StableUnCLIPImg2ImgPipeline"), unclip_constants, unclip_components,
                        unclip_support_files)
