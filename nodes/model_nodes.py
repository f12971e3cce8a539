"""Advanced model nodes: write a context value, and show the adapted model's tree."""

from __future__ import annotations

from .wires import MODEL, ContextPatch, ModelWire, parse_context_value


class FluxionSetContext:
    """Write a value into one of the model's named contexts (Context API) for the sampling run."""

    DESCRIPTION = (
        "Advanced: sets context[key] = value in the UNet's Context API for the runs of the returned model "
        "(the input model is unchanged). The value is JSON; lists of numbers become tensors."
    )
    CATEGORY = "fluxion/advanced"
    FUNCTION = "set_context"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the context value in its stack.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model to set the context on."}),
                "context": (
                    "STRING",
                    {
                        "default": "cross_attention_block",
                        "tooltip": "Context name (see Fluxion Inspect Model).",
                    },
                ),
                "key": ("STRING", {"default": "", "tooltip": "Key inside the context."}),
                "value": (
                    "STRING",
                    {
                        "default": "0",
                        "multiline": True,
                        "tooltip": 'JSON value: 0.5, [1, 2], {"a": 1}, "text".',
                    },
                ),
            }
        }

    def set_context(self, model: ModelWire, context: str, key: str, value: str) -> tuple[ModelWire]:
        if not context.strip() or not key.strip():
            raise ValueError("context and key must not be empty")
        return (model.with_patch(ContextPatch(context.strip(), key.strip(), parse_context_value(value))),)


class FluxionInspectModel:
    """Show the model's Chain tree as the sampler will run it, adapters included."""

    DESCRIPTION = (
        "Shows the model's layer tree with every adapter of its stack injected: the structure you wired."
    )
    CATEGORY = "fluxion/advanced"
    FUNCTION = "inspect"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("tree",)
    OUTPUT_TOOLTIPS = ("The tree as text.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": (MODEL, {"tooltip": "The model (and its adapter stack) to show."})}}

    def inspect(self, model: ModelWire) -> dict:
        tree = model.describe()
        return {"ui": {"text": [tree]}, "result": (tree,)}


NODE_CLASS_MAPPINGS = {"FluxionSetContext": FluxionSetContext, "FluxionInspectModel": FluxionInspectModel}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxionSetContext": "Fluxion Set Context",
    "FluxionInspectModel": "Fluxion Inspect Model",
}
