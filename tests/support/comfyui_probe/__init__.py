"""A test-only ComfyUI node pack: saves LATENT, IMAGE and CONDITIONING tensors, so a test reads what nodes made.

Linked into a test ComfyUI's custom_nodes by tests/nodes/test_real_comfyui_core_types.py; never shipped.
"""

import os

from safetensors.torch import save_file


class TestProbeSaveTensors:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"name": ("STRING", {"default": "tensors"})},
            "optional": {"latent": ("LATENT",), "image": ("IMAGE",), "conditioning": ("CONDITIONING",)},
        }

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def save(self, name, latent=None, image=None, conditioning=None):
        import folder_paths

        tensors = {}
        if latent is not None:
            tensors["samples"] = latent["samples"].detach().float().cpu().contiguous()
        if image is not None:
            tensors["image"] = image.detach().float().cpu().contiguous()
        for index, (embedding, options) in enumerate(conditioning or []):
            tensors[f"conditioning_{index}"] = embedding.detach().float().cpu().contiguous()
            if options.get("mask") is not None:
                tensors[f"mask_{index}"] = options["mask"].detach().float().cpu().contiguous()
        save_file(tensors, os.path.join(folder_paths.get_output_directory(), f"{name}.safetensors"))
        return {}


NODE_CLASS_MAPPINGS = {"TestProbeSaveTensors": TestProbeSaveTensors}
