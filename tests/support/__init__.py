"""Shared test helpers: tiny reference models (diffusers/transformers) and ours on the same weights."""
