"""Models built with fluxion: CLIP, the SD1.5/SDXL autoencoder, UNet, solvers and pipelines, adapters, format key maps."""

if "." not in __name__:  # imported from the repository root: become the pack's module (see fluxion._toplevel)
    from fluxion._toplevel import alias_to_pack

    alias_to_pack(__name__)
