"""foundationals"""

if "." not in __name__:  # imported from the repository root: become the pack's module (see fluxion._toplevel)
    from fluxion._toplevel import alias_to_pack

    alias_to_pack(__name__)
