"""The IP-Adapter options of ``latentrt generate`` (bundles exported with ``--ip-adapter``)."""

from __future__ import annotations


def add_ip_adapter_args(p) -> None:
    p.add_argument("--ip-image", metavar="IMAGE", help="an image prompt (ip_adapter_image) for a bundle exported "
                                                        "with --ip-adapter")
    p.add_argument("--ip-scale", type=float, metavar="S", help="ip_adapter_scale (default 1.0), e.g. 0.6")


def ip_adapter_kwargs(args) -> dict:
    """The pipeline's image-prompt keyword arguments from --ip-image / --ip-scale."""
    image, scale = getattr(args, "ip_image", None), getattr(args, "ip_scale", None)
    if image is None:
        if scale is not None:
            raise SystemExit("--ip-scale needs --ip-image (the image prompt)")
        return {}
    from ..runtime.image import load_image

    return {"ip_adapter_image": load_image(image), **({"ip_adapter_scale": scale} if scale is not None else {})}


def ip_adapter_settings(args) -> dict:
    """What the saved settings record of the image prompt."""
    if getattr(args, "ip_image", None) is None:
        return {}
    return {"ip_adapter_image": args.ip_image, "ip_adapter_scale": 1.0 if args.ip_scale is None else args.ip_scale}
