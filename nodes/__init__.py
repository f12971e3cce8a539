"""The ComfyUI nodes (one module per feature, merged in registry.py), the host adapter and the headless runner."""

if "." not in __name__:  # imported from the repository root: become the pack's module (see fluxion._toplevel)
    from fluxion._toplevel import alias_to_pack

    alias_to_pack(__name__)
