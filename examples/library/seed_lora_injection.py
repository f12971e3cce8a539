"""The seed's third snippet: LoRA injected in every attention's linear layers with the Adapter API."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # make the repository importable from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_vit_chain import ViT  # noqa: E402

import fluxion.layers as fl  # noqa: E402
from fluxion.adapters.lora import SingleLoraAdapter  # noqa: E402

if __name__ == "__main__":
    vit = ViT(embedding_dim=768, image_size=224, num_heads=12)  # ~ViT-B/16 like
    x = torch.randn(2, 3, 224, 224)
    before = vit(x)

    for layer in vit.layers(fl.Attention):
        for linear, parent in layer.walk(fl.Linear):
            SingleLoraAdapter(target=linear, rank=64).inject(parent)

    # ... and load existing weights if the LoRAs are pretrained ...
    after = vit(x)
    print("LoRA adapters:", len(list(vit.layers(SingleLoraAdapter))))
    print("output unchanged by fresh LoRAs:", torch.equal(before, after))
