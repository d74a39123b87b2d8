"""Diffusion glue: build the improved_diffusion object from the config; the training objective."""
