"""ComfyUI-Fluxion: ComfyUI's entry point to the pack."""

from .nodes.registry import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"
"""The pack's web extension: text outputs shown on the nodes, older workflows' types renamed on load."""

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
