"""The pack's node registry: what ComfyUI loads (through the root `__init__.py`).

Model nodes add themselves here: `NODE_CLASS_MAPPINGS["FluxionXxx"] = FluxionXxx` and a display
name in `NODE_DISPLAY_NAME_MAPPINGS`. Every node id carries the "Fluxion" prefix so it cannot
collide with ComfyUI's own nodes or another pack's (see `contract.check_node_contract`).
"""

from __future__ import annotations

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
