"""Latent diffusion models: autoencoder, UNets, solvers, SD1.5/SDXL models and their adapters."""
