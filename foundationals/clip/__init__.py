"""CLIP for Stable Diffusion: byte-level BPE tokenizer, ComfyUI prompt features, text encoders."""
