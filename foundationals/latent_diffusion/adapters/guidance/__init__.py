"""Guidance as adapters: FreeU (v1, v2), perturbed-attention (PAG) and self-attention guidance (SAG), rescaled CFG
and CFG cutoff. Each is a `ModelPatch` of a model's stack, applied for one sampling run and undone after it;
PAG, SAG and the CFG changes add a hook to the run (see `latent_diffusion/guidance.py`)."""

from .cfg import RESCALE_SPACES, CFGCutoffPatch, RescaleCFGPatch, rescale_to
from .freeu import FREEU_RULES, FreeUPatch, fourier_filter, freeu_factors, inject_freeu
from .layers import match_self_attention_blocks, named_self_attention_blocks
from .pag import PAGPatch, PerturbedAttentionGuidance
from .sag import SAGPatch, SelfAttentionGuidance, gaussian_blur

__all__ = [
    "FREEU_RULES",
    "RESCALE_SPACES",
    "CFGCutoffPatch",
    "FreeUPatch",
    "PAGPatch",
    "PerturbedAttentionGuidance",
    "RescaleCFGPatch",
    "SAGPatch",
    "SelfAttentionGuidance",
    "fourier_filter",
    "freeu_factors",
    "gaussian_blur",
    "inject_freeu",
    "match_self_attention_blocks",
    "named_self_attention_blocks",
    "rescale_to",
]
