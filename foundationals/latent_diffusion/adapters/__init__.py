"""Adapters on the SD models: one module or package per adapter, each declaring its model and how it patches the UNet."""
